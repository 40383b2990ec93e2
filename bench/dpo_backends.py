"""DPO training speed and memory: trainer.dpo's `unsloth` backend vs its `peft` baseline on the same run,
plus trainer.plan's estimate against the measured peak.

    python bench/dpo_backends.py --model /tmp/m7b [--pairs 112] [--backends peft,unsloth] [--out /tmp/dpo-bench]
                                 [--batch 2 --accum 4 --words 300]

Each backend trains in its own process (Unsloth patches transformers/TRL on import) through the real CLI,
`python -m trainer.dpo`, on the same synthetic pairs (~300-word responses, prompts rendered with the
base-model template): 4-bit base, LoRA r=64 on all seven projections, batch 2 x accumulation 4 by default
(`--batch 8 --accum 1 --words 700`: the memory-bound setting, ~1.2k-token sequences). The
throughput callback reports the median optimizer-step time after warm-up (pairs/s) and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shared.prompting import load_template
from shared.records import content_hash

WORDS = ("the model answer should follow every instruction with care and give a clear useful reply about "
         "water trees cities music history science people weather travel food health work learning").split()


def make_pairs(out: Path, n: int, words: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    tpl = load_template()
    rows = []
    for i in range(n):
        ins = f"Write about topic {i} in about {words} words."
        chosen = " ".join(rng.choice(WORDS) for _ in range(words))
        rejected = " ".join(rng.choice(WORDS) for _ in range(words))
        rows.append({"id": content_hash(i, seed), "prompt": tpl.render(ins), "chosen": chosen, "rejected": rejected,
                     "instruction_id": f"bench-{i}", "constraints": "[]", "principle_id": "bench",
                     "chosen_passed": 1, "rejected_passed": 0, "model": "bench", "round": 0})
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "shard-00000.parquet")
    return out


def run_backend(backend: str, model: str, pairs: Path, root: Path, steps: int, precompute_ref: bool = False,
                batch: int = 2, accum: int = 4) -> dict:
    name = backend + ("-ref" if precompute_ref else "")
    overrides = [f"run.root={root}", f"run.name={name}", f"train.backend={backend}", f"train.base_model={model}",
                 f"train.precompute_ref_log_probs={str(precompute_ref).lower()}",
                 f"train.pairs_dir={pairs}", "train.lora_r=64", f"train.per_device_train_batch_size={batch}",
                 f"train.gradient_accumulation_steps={accum}", f"train.max_steps={steps}", "train.max_length=2048",
                 "train.save_steps=100000", "train.eval_split=0", "train.report_to=[]",
                 "train.load_in_4bit=true", "train.learning_rate=5e-6"]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "trainer.dpo", *overrides], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        print(f"--- {name} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}", flush=True)
        return {"backend": name, "failed": True}
    summary = json.loads((root / name / "round-0" / "adapter" / "train_summary.json").read_text())
    return {"backend": name, "wall_s": wall, **summary["throughput"], "loss": summary["metrics"].get("loss"),
            "plan_peak_gib": plan_peak(overrides), "plan_peak_gib_longest_row": plan_peak(
                [*overrides, f"train.max_length={longest_row(model, pairs)}"])}


def plan_peak(overrides: list[str]) -> float | None:
    plan = subprocess.run([sys.executable, "-m", "trainer.plan", *overrides, "--gpu-gib", "80"], capture_output=True,
                          text=True)
    est = re.search(r"peak_gib: ([\d.]+)", plan.stdout)
    return float(est.group(1)) if est else None


def longest_row(model: str, pairs: Path) -> int:
    """Tokens of the longest prompt+response row: the planner's worst case is max_length, the bench's rows are
    shorter, so the estimate is also printed at this length (apples to apples)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = pq.read_table(pairs).to_pylist()
    return max(len(tok(r["prompt"] + r[k]).input_ids) + 1 for r in rows for k in ("chosen", "rejected"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", type=int, default=112)
    ap.add_argument("--words", type=int, default=300)
    ap.add_argument("--backends", default="peft,unsloth", help="comma list; a '+ref' suffix (unsloth+ref) "
                    "precomputes reference log-probs before training (what pairs scored by the server give)")
    ap.add_argument("--batch", type=int, default=2, help="per-device batch (pairs)")
    ap.add_argument("--accum", type=int, default=4, help="gradient accumulation steps")
    ap.add_argument("--out", default="/tmp/dpo-bench")
    args = ap.parse_args()
    out = Path(args.out)
    pairs = make_pairs(out / "pairs", args.pairs, args.words)
    steps = args.pairs // (args.batch * args.accum)
    print(f"setting: {args.pairs} pairs, ~{args.words}-word responses, batch {args.batch} x accumulation {args.accum}, "
          f"{steps} optimizer steps per backend", flush=True)
    results = []
    for b in args.backends.split(","):
        backend, _, ref = b.partition("+")
        res = run_backend(backend, args.model, pairs, out / f"runs-b{args.batch}-w{args.words}", steps,
                          precompute_ref=ref == "ref", batch=args.batch, accum=args.accum)
        results.append(res)
        print(json.dumps(res), flush=True)
    ok = [r for r in results if not r.get("failed")]
    for r in ok:
        peak = f"{r['peak_vram_gib']:.1f} GiB" if r["peak_vram_gib"] is not None else "n/a (no GPU)"
        print(f"{r['backend']:>8}: {r['pairs_per_s']:.2f} pairs/s per optimizer step (median {r['step_s_median']:.2f}s "
              f"over {r['steps_timed']} steps), peak {peak} (plan: {r['plan_peak_gib']} GiB at max_length, "
              f"{r['plan_peak_gib_longest_row']} GiB at the longest row), "
              f"process wall {r['wall_s']:.0f}s")
    if len(ok) >= 2 and all(r["peak_vram_gib"] for r in ok):
        a = ok[0]  # the first backend is the baseline
        for b in ok[1:]:
            print(f"ratio {b['backend']}/{a['backend']}: {b['pairs_per_s'] / a['pairs_per_s']:.2f}x pairs/s, "
                  f"{b['peak_vram_gib'] / a['peak_vram_gib']:.2f}x peak memory")


if __name__ == "__main__":
    main()
