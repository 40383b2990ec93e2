"""Cost per 1,000 verified pairs: measured for the model a run built them with, estimated for larger shapes.

    python bench/pair_cost.py docs/runs/base-gpu/run-5/round-*-ledger.jsonl [--usd-per-hour 1.74]

A verified pair is a checker pair (``accepted_pairs`` in the ``pairs`` stage of a round's ledger): chosen passes
every constraint rejected passes and more, by the eval's own checkers. The extra pairs built from the same
candidates (stop pairs, contrasts) come free and are not counted.

* Measured: the pairs stages' GPU time (one GPU a server replica) over their verified pairs.
* Estimated for the Qwen2.5-7B and -32B shapes on each card of ``pipeline.plan.CARDS``: the run's completion tokens
  per verified pair at the whole-stage decoding rate ``pipeline plan`` uses (measured at 7B on an H200, scaled by
  parameters and memory bandwidth), as a range: from the prompt tokens costing nothing more (the few-shot template
  is most of them, and vLLM caches that shared prefix) to every prompt token prefilled anew at
  :data:`PREFILL_MFU` of the card's bf16 peak. A larger model is assumed to need as many tokens per verified
  pair as the run's model (a stronger model is accepted more often: the estimate is high on that count).
* Beside them, the published figure the issue compares with: Hugging Face's constitutional-AI recipe, about 2.3
  H100-hours per 1,000 pairs at 7B. The ratio is ours over theirs (below 1: cheaper).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HF_CAI_H100_HOURS_PER_1000 = 2.3  # HF constitutional-AI recipe, 7B, as the scale-out issue quotes it
SHAPES = ("qwen2.5-7b", "qwen2.5-32b")
PREFILL_MFU = 0.4  # *assumed*: prefill at 40% of the card's dense bf16 peak, 2 FLOPs a parameter a token


def pairs_stages(paths: list[Path]) -> list[dict]:
    """Every successful ``pairs`` stage of the given ledgers (one per round)."""
    out = []
    for p in paths:
        for line in p.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("stage") == "pairs" and row.get("status") == "ok":
                out.append(row)
    if not out:
        raise SystemExit(f"no successful pairs stage in {', '.join(map(str, paths))}: pass a run's round-K/ledger.jsonl")
    return out


def main(argv: list[str] | None = None) -> int:
    from pipeline.plan import CARDS, MEASURED_ON, _decode_rate
    from trainer.plan import KNOWN_SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ledgers", nargs="+", type=Path, help="round-K/ledger.jsonl files of one run")
    ap.add_argument("--usd-per-hour", type=float, default=1.74, help="dollars per GPU-hour for the estimates")
    args = ap.parse_args(argv)

    stages = pairs_stages(args.ledgers)
    pairs = sum(s["accepted_pairs"] for s in stages)
    gpu_s = sum(s["wall_s"] * s.get("servers", 1) for s in stages)
    completion = sum(s["completion_tokens"] for s in stages)
    prompt = sum(s["prompt_tokens"] for s in stages)
    measured_h = gpu_s / 3600 / pairs * 1000
    print(f"run: {len(stages)} pairs stage(s), {pairs} verified pairs, {gpu_s:.0f} GPU-s, "
          f"{completion / pairs:,.0f} completion and {prompt / pairs:,.0f} prompt tokens per verified pair")
    print(f"baseline: HF constitutional-AI recipe, {HF_CAI_H100_HOURS_PER_1000} H100-hours per 1,000 pairs at 7B "
          f"(published, as quoted)\n")
    print("| model | card | GPU-hours / 1,000 verified pairs | $ / 1,000 | vs HF 7B recipe | how |")
    print("|---|---|---|---|---|---|")
    print(f"| the run's model | {CARDS[MEASURED_ON].name} | {measured_h:.3f} | "
          f"{measured_h * args.usd_per_hour:.2f} | {measured_h / HF_CAI_H100_HOURS_PER_1000:.3f}x | measured |")
    for name in SHAPES:
        params = KNOWN_SHAPES[name].params
        for card in CARDS.values():
            rate, _ = _decode_rate(params, card, eager=False, stage="pairs")
            lo = completion / pairs * 1000 / rate / 3600
            hi = lo + prompt / pairs * 1000 * 2 * params / (card.bf16_tflops * 1e12 * PREFILL_MFU) / 3600
            print(f"| {name} | {card.name} | {lo:.2f} to {hi:.2f} | {lo * args.usd_per_hour:.2f} to "
                  f"{hi * args.usd_per_hour:.2f} | {lo / HF_CAI_H100_HOURS_PER_1000:.2f}x to "
                  f"{hi / HF_CAI_H100_HOURS_PER_1000:.2f}x | {rate:,.0f} completion tok/s (estimated) |")
    print(f"\n$ at --usd-per-hour {args.usd_per_hour} for every row. Estimates: decoding alone (prompt prefix cached) "
          f"to decoding plus every prompt token prefilled at {PREFILL_MFU:.0%} MFU (*assumed*); the run's tokens per "
          "verified pair (high for a stronger model).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
