"""Serve a model dir behind an OpenAI-compatible API (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health``). Blocks until stopped (SIGTERM / Ctrl-C).

    python -m gen_server --model DIR_OR_PACKAGED_NAME [--backend embedded|vllm] [--host 127.0.0.1]
        [--port 8000] [--api-key K] [--served-model-name N] [--dtype auto] [--max-model-len N] [--seed 0]
        embedded only: [--max-batch-size 16] [--max-prompts 64] [--max-n 16] [--max-stop 16]
                       [--max-request-tokens 65536] [--max-scored-tokens 16384]
        vllm only:     [--quantization fp8|none] [--gpu-memory-utilization 0.9] [--tensor-parallel-size 1]
                       [--data-parallel-size 1] [--enable-prefix-caching | --no-enable-prefix-caching]
                       [--health-timeout 900] [--log-file PATH] [-- ARGS PASSED TO VLLM VERBATIM]

Examples:

    python -m gen_server --model smollm2-135m                       # packaged demo model, CPU
    GEN_SERVER_API_KEY=secret python -m gen_server --model /models/qwen2.5-32b --backend vllm \\
        --quantization fp8 --max-model-len 8192 -- --max-num-seqs 256

The default backend is vllm when a CUDA GPU is visible and vllm is installed, else embedded (CPU).
The API key is read from ``$GEN_SERVER_API_KEY`` when ``--api-key`` is not given; prefer the
variable, since command lines are visible to other users of the machine.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from gen_server import backends
from gen_server.backends import LIMITS
from gen_server.models import KNOWN_MODELS, ModelPrepareError, UnknownModelError, check_model_dir, resolve_model
from shared.log import setup_logging

log = logging.getLogger("gen_server")

DTYPES = ["auto", "bfloat16", "float16", "float32"]
# Options only one backend understands (gen_server.backends): given for another they are an error, not ignored.


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m gen_server",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` are passed to vLLM verbatim (vllm backend only).",
    )
    ap.add_argument(
        "--model",
        required=True,
        help=f"model directory (with config.json) or a packaged model name: {', '.join(KNOWN_MODELS)}",
    )
    ap.add_argument(
        "--backend",
        choices=list(backends.BACKENDS),
        default=None,
        help="default: vllm if a CUDA GPU is visible and vllm is installed, else embedded",
    )
    ap.add_argument("--host", default="127.0.0.1", help="bind address; keep loopback unless you need remote clients")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument(
        "--api-key",
        default=os.environ.get("GEN_SERVER_API_KEY"),
        help="require this bearer key on /v1 (default: $GEN_SERVER_API_KEY; none if unset)",
    )
    ap.add_argument("--allow-insecure", action="store_true",
                    help="serve a non-loopback --host without an API key (anyone who reaches the port can use it)")
    ap.add_argument(
        "--served-model-name", default=None, help="model id in the API (default: the packaged name, or the model path)"
    )
    ap.add_argument("--dtype", choices=DTYPES, default="auto")
    ap.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    emb = ap.add_argument_group("embedded backend (CPU)")
    emb.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="requests decoded together (default 16); higher is more throughput and memory",
    )
    emb.add_argument("--max-prompts", type=int, default=None, help="prompts in one request (default 64)")
    emb.add_argument("--max-n", type=int, default=None, help="choices per prompt (default 16)")
    emb.add_argument("--max-stop", type=int, default=None, help="stop strings per request (default 16)")
    emb.add_argument("--max-request-tokens", type=int, default=None,
                     help="prompt + max_tokens over every choice of a request (default 65536)")
    emb.add_argument("--max-scored-tokens", type=int, default=None,
                     help="prompt tokens scored with log-probs in one request (default 16384)")

    vl = ap.add_argument_group("vllm backend (GPU)")
    vl.add_argument(
        "--quantization",
        choices=["fp8", "none"],
        default=None,
        help="fp8: on-the-fly fp8 weights, ~1.24x bf16 throughput on H100 (default: none)",
    )
    vl.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="share of GPU memory vLLM may take; higher is a bigger KV cache (default 0.9)",
    )
    vl.add_argument("--tensor-parallel-size", type=int, default=None, help="GPUs per model replica (default 1)")
    vl.add_argument("--data-parallel-size", type=int, default=None, help="model replicas (default 1)")
    vl.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse KV cache across prompts sharing a prefix, e.g. the few-shot template (default: vLLM's)",
    )
    vl.add_argument(
        "--health-timeout",
        type=float,
        default=None,
        help="seconds to wait for /health after start (default 900; large models compile first)",
    )
    vl.add_argument(
        "--log-file",
        default=None,
        help="where vLLM's output is also written (default: $TMPDIR/gen_server-vllm-PORT.log)",
    )
    return ap


def is_loopback(host: str) -> bool:
    """``host`` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: may resolve to anything


def _validate(args: argparse.Namespace, passthrough: list[str]) -> list[str]:
    """Every problem with the arguments at once, before any heavy import or model loading."""
    problems = []
    if not 1 <= args.port <= 65535:
        problems.append(f"--port must be in 1..65535, got {args.port}")
    if not args.host:
        problems.append("--host must not be empty")
    elif not args.api_key and not args.allow_insecure and not is_loopback(args.host):
        problems.append(f"--host {args.host} serves other machines, and no API key is set: anyone who reaches the "
                        "port could use the server. Set GEN_SERVER_API_KEY (or --api-key), or pass --allow-insecure")
    if args.max_model_len is not None and args.max_model_len < 1:
        problems.append(f"--max-model-len must be positive, got {args.max_model_len}")
    for name in ("max_batch_size", *LIMITS):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        problems.append(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    for name in ("tensor_parallel_size", "data_parallel_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.health_timeout is not None and args.health_timeout <= 0:
        problems.append(f"--health-timeout must be positive, got {args.health_timeout}")
    if args.backend is not None and (wrong := backends.only_given(args.backend, args, passthrough)):
        problems.append(_misplaced(wrong))
    return problems


def _misplaced(by_owner: dict[str, list[str]]) -> str:
    """``--x, --y only apply to --backend B`` for each backend that owns some of the options given."""
    return "; ".join(f"{', '.join(fs)} only apply to --backend {o}" for o, fs in by_owner.items())


def choose_backend() -> tuple[str, str]:
    """(backend, why) when --backend is not given: the first of ``gen_server.backends.PREFERENCE`` that can run."""
    return backends.choose()


def _model_dir(model: str, max_model_len: int | None = None, passthrough: list[str] = ()) -> Path:
    """Resolve --model to a loadable model dir; UnknownModelError says what is wrong and what to pass instead."""
    model_dir = resolve_model(model)
    args = list(passthrough)
    dummy = "--load-format=dummy" in args or any(a == "--load-format" and b == "dummy" for a, b in zip(args, args[1:]))
    problems = check_model_dir(model_dir, max_model_len=max_model_len, need_weights=not dummy)
    if problems:
        raise UnknownModelError("; ".join(problems))
    return model_dir


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first bare `--` belongs to vLLM, even flags we also define.
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    ap = build_parser()
    args = ap.parse_args(argv)
    setup_logging(args.log_level)

    problems = _validate(args, passthrough)
    if problems:
        ap.error("\n  ".join(["invalid arguments:", *problems]))

    try:
        model_dir = _model_dir(args.model, args.max_model_len, passthrough)
    except UnknownModelError as e:
        log.error("%s", e)
        return 2
    except ModelPrepareError as e:
        log.error("could not prepare packaged model %s: %s", args.model, e)
        return 1
    served_name = args.served_model_name or (args.model if args.model in KNOWN_MODELS else None)

    backend = args.backend
    if backend is None:
        try:
            backend, why = choose_backend()
        except RuntimeError as e:
            log.error("%s", e)
            return 2
        log.info("backend: %s (%s; pass --backend to choose)", backend, why)
        if wrong := backends.only_given(backend, args, passthrough):
            log.error("%s, but %s was chosen (%s)", _misplaced(wrong), backend, why)
            return 2
    return backends.get(backend).run(args, model_dir, served_name, passthrough)


if __name__ == "__main__":
    raise SystemExit(main())
