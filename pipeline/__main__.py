"""The whole loop as one command, round after round, with stopping rules and a report.

    python -m pipeline run --config configs/demo-cpu.yaml [--rounds K] [a.b=c ...]
    python -m pipeline status runs/demo
    python -m pipeline report --config configs/demo-cpu.yaml
    python -m pipeline plan --config configs/qwen2.5-32b-a100.yaml [--rounds N] [--shape qwen2.5-32b]

`run` after a crash continues from the last finished step. Exit codes: 0 finished (a stopping rule fired),
1 a step failed (rerun to continue) or, for `plan`, the plan does not fit the card; 2 bad config (for `run`, a
plan that does not fit too: it is refused before any server starts).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from shared.config import ConfigError, add_config_args, config_from_args
from shared.log import setup_logging

log = logging.getLogger("pipeline")


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run or continue the round loop")
    add_config_args(r, required=True)
    r.add_argument("--rounds", type=int, help="max DPO rounds (overrides pipeline.rounds)")
    s = sub.add_parser("status", help="where a run stands")
    s.add_argument("run_dir", type=Path)
    rep = sub.add_parser("report", help="(re)write RUN/report.md and report.html")
    add_config_args(rep, required=True)
    pl = sub.add_parser("plan", help="time, GPU memory, host RAM, disk and dollars per stage and round, before "
                        "a GPU-hour is spent; last line fits: yes|no")
    add_config_args(pl, required=True)
    pl.add_argument("--rounds", type=int, help="rounds to price (default pipeline.rounds)")
    pl.add_argument("--shape", help="plan a known model shape without its files (trainer.plan.KNOWN_SHAPES)")
    args = ap.parse_args(argv)
    setup_logging()
    # SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C: the running stage and the server are stopped by
    # their `finally`s, finished steps are kept, and `pipeline run` resumes.
    signal.signal(signal.SIGTERM, _terminated)

    from eval.run import EvalError
    from pipeline.run import PipelineError, run, status
    from shared.client import ServerUnavailable

    if args.cmd == "status":
        print(status(args.run_dir))
        from pipeline.state import RunState

        return 0 if RunState(args.run_dir).path.exists() else 1  # a dir with no run in it is an error
    try:
        if getattr(args, "rounds", None):
            args.overrides.append(f"pipeline.rounds={args.rounds}")
        cfg = config_from_args(args)
        if args.cmd == "plan":
            from pipeline.plan import plan, render, shape_for

            shape, name = shape_for(cfg, args.shape)
            pl = plan(cfg, shape, model=name)
            print(render(pl))
            return 0 if pl.fits else 1
        if args.cmd == "report":
            from pipeline.report import write_report
            from pipeline.state import RunState
            from shared.rundir import RunDir

            rd = RunDir.from_config(cfg)
            print(write_report(cfg, rd, RunState(rd.path)))
            return 0
        return run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (EvalError, ServerUnavailable) as e:  # the round's server failed it; finished steps are kept
        print(f"error: {e}\nFix the cause and run `python -m pipeline run` again: finished steps are kept.",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
