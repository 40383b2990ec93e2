"""Serving backends: one registry of what each needs, what only it understands, and how it runs.

A backend is a :class:`Backend`: a name, a check that says whether it can run here (``unavailable()``: None, or
why not), the ``python -m gen_server`` options only it understands (given for another backend they are an
error, not ignored), the flags :class:`gen_server.process.ServerProcess` passes it from a ``ServerConfig``
(``config_args``), and ``run``, which serves until stopped. Everything heavy (torch, transformers, vLLM) is
imported inside ``run``: this module is light, so the pipeline and the CLI's validation import it for free.

How to add a backend (say, SGLang):

1. Write ``gen_server/sglang_backend.py`` with a ``run(...)`` that serves the OpenAI-compatible API
   (``/v1/completions``, ``/v1/models``, ``/health``, and prompt log-probs if pair building scores references).
2. Add its settings to ``shared.config.ServerConfig`` (type, bounds, description: ``python -m gen_server`` makes
   its options from that schema, :func:`gen_server.__main__.build_parser`) and name them in ``only=``; the CLI
   groups them under the backend and refuses them for any other.
3. Register it below: ``register(Backend("sglang", unavailable=..., only=(...), config_args=..., run=...))``,
   and add it to ``shared.config.ServerConfig.backend``'s choices (the CLI's ``--backend`` takes every
   registered name). :data:`PREFERENCE` orders ``auto``.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The embedded server's per-request limits: command-line options of `python -m gen_server` only.
LIMITS = ("max_prompts", "max_n", "max_stop", "max_request_tokens", "max_scored_tokens")  # embedded.RequestLimits


@dataclass(frozen=True)
class Backend:
    name: str
    unavailable: Callable[[], str | None]  # None when it can run here, else why not
    run: Callable[[argparse.Namespace, Path, str | None, list[str]], int]  # (args, model dir, served name, after --)
    config_args: Callable[[Any], list[str]]  # ServerConfig -> its backend-specific CLI flags
    only: tuple[str, ...] = ()  # CLI options (dest names) only this backend understands
    passthrough: bool = False  # takes arguments after `--` verbatim
    why_default: str = field(default="")  # said when `auto` picks it


BACKENDS: dict[str, Backend] = {}
PREFERENCE: list[str] = []  # `auto` takes the first available


def register(backend: Backend, *, prefer: bool = False) -> None:
    if backend.name in BACKENDS:
        raise ValueError(f"serving backend {backend.name!r} is already registered")
    BACKENDS[backend.name] = backend
    PREFERENCE.insert(0, backend.name) if prefer else PREFERENCE.append(backend.name)


def get(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown serving backend {name!r}; known: {', '.join(BACKENDS)}") from None


def choose() -> tuple[str, str]:
    """(backend, why) for ``auto``: the first of :data:`PREFERENCE` that can run here."""
    reasons = []
    for name in PREFERENCE:
        why_not = BACKENDS[name].unavailable()
        if why_not is None:
            return name, "; ".join(reasons) or BACKENDS[name].why_default or f"{name} can run here"
        reasons.append(why_not)
    raise RuntimeError("no serving backend can run here: " + "; ".join(reasons))


def only_given(backend: str, args: argparse.Namespace, passthrough: Sequence[str]) -> dict[str, list[str]]:
    """The options given that ``backend`` does not understand, by the backend that owns them (``--flag`` names;
    ``arguments after --`` for a passthrough backend's)."""
    mine = set(get(backend).only)
    out: dict[str, list[str]] = {}
    for b in BACKENDS.values():
        if b.name == backend:
            continue
        flags = ["--" + n.replace("_", "-") for n in b.only if n not in mine and getattr(args, n, None) is not None]
        if b.passthrough and passthrough and not get(backend).passthrough:
            flags.append("arguments after --")
        if flags:
            out[b.name] = flags
    if passthrough and not get(backend).passthrough and not any("arguments after --" in f for f in out.values()):
        out["another backend"] = [*out.get("another backend", []), "arguments after --"]
    return out


# ---- embedded (transformers on CPU) -------------------------------------------------------------------------


def _embedded_run(args: argparse.Namespace, model_dir: Path, served_name: str | None, passthrough: list[str]) -> int:
    from gen_server.embedded import RequestLimits, serve  # torch + transformers: imported only when serving

    limits = RequestLimits(**{k: getattr(args, k) for k in LIMITS if getattr(args, k) is not None})
    serve(model_dir, host=args.host, port=args.port, api_key=args.api_key, served_model_name=served_name,
          max_batch_size=args.max_batch_size or 16, max_model_len=args.max_model_len, dtype=args.dtype,
          seed=args.seed, log_level=args.log_level, limits=limits)
    return 0


def _embedded_unavailable() -> str | None:
    for mod in ("torch", "transformers"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    return None


register(Backend(
    "embedded", unavailable=_embedded_unavailable, run=_embedded_run,
    config_args=lambda s: ["--max-batch-size", str(s.max_batch_size)],
    only=("max_batch_size", *LIMITS)))


# ---- vLLM (GPU) ---------------------------------------------------------------------------------------------


def _vllm_run(args: argparse.Namespace, model_dir: Path, served_name: str | None, passthrough: list[str]) -> int:
    from gen_server.vllm_backend import VllmOptions, run_vllm

    opts = VllmOptions(
        model=str(model_dir), host=args.host, port=args.port, api_key=args.api_key, served_model_name=served_name,
        dtype=args.dtype, quantization=args.quantization or "none", max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization or 0.9, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size or 1, data_parallel_size=args.data_parallel_size or 1,
        enable_prefix_caching=args.enable_prefix_caching, extra_args=list(passthrough))
    return run_vllm(opts, health_timeout=args.health_timeout or 900.0, log_path=args.log_file)


def _vllm_unavailable() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def _vllm_config_args(s: Any) -> list[str]:
    args = ["--quantization", s.quantization, "--gpu-memory-utilization", str(s.gpu_memory_utilization),
            "--tensor-parallel-size", str(s.tensor_parallel_size), "--data-parallel-size", str(s.data_parallel_size),
            "--enable-prefix-caching" if s.enable_prefix_caching else "--no-enable-prefix-caching",
            "--health-timeout", str(s.health_timeout_s)]
    return args + (["--", *s.extra_args] if s.extra_args else [])


register(Backend(
    "vllm", unavailable=_vllm_unavailable, run=_vllm_run, config_args=_vllm_config_args,
    only=("quantization", "gpu_memory_utilization", "tensor_parallel_size", "data_parallel_size",
          "enable_prefix_caching", "health_timeout", "log_file"),
    passthrough=True, why_default="a CUDA GPU is visible and vllm is installed"), prefer=True)
