"""Instruction-following eval of whatever a generation server serves.

    python -m eval --server http://127.0.0.1:8000 --api-key K --suite own --out runs/x/eval [--gate 0.95]
    python -m eval --server http://127.0.0.1:8000,http://127.0.0.1:8001 ...   # spread over replicas
    python -m eval --config configs/demo-cpu.yaml [eval.limit=20 ...] [--round 1]
    python -m eval compare runs/x/round-0/eval runs/x/round-1/eval

Suites: ``ifeval`` (the 541 official prompts, from an installed package), ``own`` (the project's generated
prompts, held-out split), or a JSONL file of IFEval-format items. Beside the four IFEval metrics every eval
reports degeneration (truncation, loops, length, unrequested habits) and the score on the held-out
instruction types (``eval.heldout_types``), and so does ``compare``. ``--gate X`` exits 1 when the gate metric
(default prompt_loose) is below X. The API key can also come from GEN_SERVER_API_KEY.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, get_args

from shared.config import ConfigError, EvalConfig, add_config_args, config_from_args
from shared.log import setup_logging

log = logging.getLogger("eval")


def _compare(argv: list[str]) -> int:
    from eval.report import compare, format_compare

    ap = argparse.ArgumentParser(prog="python -m eval compare", description="B - A with a paired bootstrap CI.")
    ap.add_argument("a", help="eval dir of the baseline (has results.jsonl)")
    ap.add_argument("b", help="eval dir to compare against it")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--heldout-types", help="comma-separated instruction ids scored on their own "
                    "(default: those A was evaluated with)")
    ap.add_argument("--long-words", type=int, help="the long-answer habit's threshold in words (default: A's)")
    args = ap.parse_args(argv)
    types = [t.strip() for t in args.heldout_types.split(",") if t.strip()] if args.heldout_types is not None else None
    try:
        print(format_compare(compare(args.a, args.b, n_boot=args.n_boot, heldout_types=types,
                                     long_words=args.long_words), args.a, args.b))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _given(flag: Any, default: Any) -> Any:
    """The flag's value when given (0 included: run_eval refuses it), else the config's."""
    return default if flag is None else flag


def _servers(flags: list[str] | None) -> list[str]:
    """The URLs of every ``--server`` (each one URL or a comma list)."""
    return [u.strip() for f in flags or [] for u in f.split(",") if u.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return _compare(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--server", action="append", help="server URL (default: the config's server.host/port); "
                    "several replicas of one model: repeat it or give a comma list, and the eval spreads over them")
    ap.add_argument("--model", help="served model name (default: the first the server lists)")
    ap.add_argument("--api-key", default=None, help="default: $GEN_SERVER_API_KEY, else the config's server.api_key")
    ap.add_argument("--suite", help="ifeval | own | hub[:repo] | FILE.jsonl (default: eval.suite)")
    ap.add_argument("--limit", type=int, help="only the first N prompts")
    ap.add_argument("--prompt-style", choices=["base", "chat"])
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--concurrency", type=int, help="prompts in flight (default: eval.concurrency)")
    ap.add_argument("--prompts-per-request", type=int, help="completion prompts per request, 1 = one each "
                    "(default: eval.prompts_per_request)")
    ap.add_argument("--out", help="output dir (default: runs/<name>/round-<k>/eval)")
    ap.add_argument("--round", type=int, default=0, help="round whose eval dir is the default --out")
    ap.add_argument("--gate", type=float, nargs="?", const=-1.0,
                    help="exit 1 when the gate metric is below X (bare --gate: eval.target, default 0.95)")
    ap.add_argument("--gate-metric", choices=list(get_args(EvalConfig.model_fields["gate_metric"].annotation)))
    args = ap.parse_args(argv)
    setup_logging()
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ev = cfg.eval
    from eval.run import EvalError, EvalSettings, config_settings, run_eval
    from shared.client import ServerUnavailable
    from shared.rundir import RunDir

    out = args.out or RunDir.from_config(cfg).round(args.round, create=False).eval
    kw = config_settings(cfg)  # the config's settings; the flags given override them
    kw.update(suite=args.suite or ev.suite, limit=_given(args.limit, ev.limit),
              concurrency=_given(args.concurrency, ev.concurrency),
              prompts_per_request=_given(args.prompts_per_request, ev.prompts_per_request),
              settings=EvalSettings(prompt_style=args.prompt_style or ev.prompt_style,
                                    max_tokens=_given(args.max_tokens, ev.max_tokens), temperature=ev.temperature))
    try:
        scores = run_eval(
            base_urls=_servers(args.server) or [cfg.server.base_url], model=args.model or cfg.server.served_model_name,
            api_key=args.api_key or os.environ.get("GEN_SERVER_API_KEY") or cfg.server.api_key, out_dir=out, **kw)
    except (EvalError, ServerUnavailable, PermissionError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metric = args.gate_metric or ev.gate_metric
    print(f"{scores['suite']}: {scores['n_prompts']} prompts  " + "  ".join(
        f"{m}={scores[m]:.4f}" for m in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")))
    deg, held = scores.get("degeneration"), scores["heldout"]
    if deg:
        print(f"degeneration: truncated={deg['truncation_rate']:.3f} looping={deg['loop_rate']:.3f} "
              f"median_words={deg['words_median']:.0f} " + " ".join(
                  f"{h}={v['rate']:.3f}" for h, v in deg["habits"].items() if v["rate"] is not None))
    if held["n_instructions"]:
        print(f"held-out types: {held['n_instructions']} instructions, strict={held['strict']:.4f} "
              f"loose={held['loose']:.4f}")
    print(f"wrote {out}/scores.json, report.md")
    gate = ev.target if args.gate == -1.0 else args.gate
    if gate is not None and scores[metric] < gate:
        print(f"gate failed: {metric}={scores[metric]:.4f} < {gate}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
