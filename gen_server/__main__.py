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
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError

from gen_server import backends
from gen_server.backends import LIMITS
from gen_server.models import KNOWN_MODELS, ModelPrepareError, UnknownModelError, check_model_dir, resolve_model
from shared.config import ServerConfig
from shared.log import setup_logging

log = logging.getLogger("gen_server")

# ServerConfig (shared/config.py) declares the server's settings, their types, bounds and help: the CLI is made
# from it. Fields the CLI names differently (the argparse dest), and the one it takes after `--`:
DEST = {"health_timeout_s": "health_timeout"}
AFTER_DASHDASH = {"extra_args"}
# how many servers the pipeline starts, and where: not settings of one server
PIPELINE_ONLY = {"replicas", "placement", "ray_address", "ray_resource"}
CLI_HELP = {  # what the CLI says instead of the schema's default
    "model": f"Required. Packaged: {', '.join(KNOWN_MODELS)}.",
    "api_key": "Default: $GEN_SERVER_API_KEY; none if unset.",
}


def _owner(dest: str) -> str | None:
    """The backend that alone understands option ``dest`` (gen_server.backends), or None for a common one."""
    return next((b.name for b in backends.BACKENDS.values() if dest in b.only), None)


def _field_kwargs(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a ServerConfig field's type: choices for a Literal, --x/--no-x for a bool."""
    if get_origin(annotation) in (Union, types.UnionType):  # X | None
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        return {"choices": list(get_args(annotation))}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float):
        return {"type": annotation}
    return {}


def build_parser() -> argparse.ArgumentParser:
    """``python -m gen_server``'s options: one per ServerConfig field (its type, choices and description; the
    default None means "not given", so the backend check can tell what was asked for), grouped by the backend
    that alone understands it, plus the few that only a command line has (logging, --allow-insecure, the
    embedded server's per-request limits)."""
    ap = argparse.ArgumentParser(
        prog="python -m gen_server",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` are passed to vLLM verbatim (vllm backend only).",
    )
    groups = {None: ap, "embedded": ap.add_argument_group("embedded backend (CPU)"),
              "vllm": ap.add_argument_group("vllm backend (GPU)")}
    for name, f in ServerConfig.model_fields.items():
        if name in AFTER_DASHDASH | PIPELINE_ONLY:
            continue
        dest = DEST.get(name, name)
        owner = _owner(dest)
        group = groups.get(owner) or groups.setdefault(owner, ap.add_argument_group(f"{owner} backend"))
        default = None
        if name == "api_key":
            default = os.environ.get("GEN_SERVER_API_KEY")
        kwargs = _field_kwargs(f.annotation)
        if name == "backend":  # the registry's: a backend registered at run time is a choice too
            kwargs["choices"] = ["auto", *backends.BACKENDS]
        group.add_argument("--" + dest.replace("_", "-"), dest=dest, default=default, required=name == "model",
                           help=f"{f.description} {CLI_HELP.get(name) or f'Default: {f.default}.'}", **kwargs)
    ap.add_argument("--allow-insecure", action="store_true",
                    help="serve a non-loopback --host without an API key (anyone who reaches the port can use it)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    emb = groups["embedded"]
    emb.add_argument("--max-prompts", type=int, default=None, help="prompts in one request (default 64)")
    emb.add_argument("--max-n", type=int, default=None, help="choices per prompt (default 16)")
    emb.add_argument("--max-stop", type=int, default=None, help="stop strings per request (default 16)")
    emb.add_argument("--max-request-tokens", type=int, default=None,
                     help="prompt + max_tokens over every choice of a request (default 65536)")
    emb.add_argument("--max-scored-tokens", type=int, default=None,
                     help="prompt tokens scored with log-probs in one request (default 16384)")
    groups["vllm"].add_argument(
        "--log-file", default=None, help="where vLLM's output is also written (default: $TMPDIR/gen_server-vllm-PORT.log)")
    return ap


def server_settings(args: argparse.Namespace) -> tuple[ServerConfig | None, list[str]]:
    """(the ServerConfig the given options make, problems): every field checked by the schema at once."""
    given = {name: getattr(args, DEST.get(name, name)) for name in ServerConfig.model_fields
             if name not in AFTER_DASHDASH | PIPELINE_ONLY | {"backend"}
             and getattr(args, DEST.get(name, name), None) is not None}
    try:
        return ServerConfig(**given), []
    except ValidationError as e:
        problems = []
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            flag = "--" + DEST.get(name, name).replace("_", "-")
            problems.append(f"{flag} {_says(err)}, got {err.get('input')!r}")
        return None, problems


def _says(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx:
            return f"must be {op} {ctx[key]}"
    return err["msg"].lower()


def is_loopback(host: str) -> bool:
    """``host`` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: may resolve to anything


def _validate(args: argparse.Namespace, passthrough: list[str]) -> list[str]:
    """Every problem with the arguments at once, before any heavy import or model loading: the schema's
    (ServerConfig), the command line's own, and options the chosen backend does not understand."""
    _, problems = server_settings(args)
    if args.host is not None and not args.host:
        problems.append("--host must not be empty")
    elif args.host and not args.api_key and not args.allow_insecure and not is_loopback(args.host):
        problems.append(f"--host {args.host} serves other machines, and no API key is set: anyone who reaches the "
                        "port could use the server. Set GEN_SERVER_API_KEY (or --api-key), or pass --allow-insecure")
    for name in LIMITS:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.backend not in (None, "auto") and (wrong := backends.only_given(args.backend, args, passthrough)):
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

    backend = args.backend or "auto"
    if backend == "auto":
        try:
            backend, why = choose_backend()
        except RuntimeError as e:
            log.error("%s", e)
            return 2
        log.info("backend: %s (%s; pass --backend to choose)", backend, why)
        if wrong := backends.only_given(backend, args, passthrough):
            log.error("%s, but %s was chosen (%s)", _misplaced(wrong), backend, why)
            return 2
    settings, _ = server_settings(args)  # valid: _validate passed
    for name, value in settings.model_dump().items():  # what was not given takes the schema's default
        dest = DEST.get(name, name)
        if name not in AFTER_DASHDASH | PIPELINE_ONLY and getattr(args, dest, None) is None:
            setattr(args, dest, value)
    args.backend = backend
    return backends.get(backend).run(args, model_dir, served_name, passthrough)


if __name__ == "__main__":
    raise SystemExit(main())
