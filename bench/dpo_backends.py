"""DPO training speed and memory: trainer.dpo's `unsloth` backend vs its `peft` baseline on the same run,
plus trainer.plan's estimate against the measured peak.

    python bench/dpo_backends.py --model /tmp/m7b [--pairs 112] [--backends peft,unsloth] [--out /tmp/dpo-bench]

Each backend trains in its own process (Unsloth patches transformers/TRL on import) through the real CLI,
`python -m trainer.dpo`, on the same synthetic pairs (~300-word responses, prompts rendered with the
base-model template): 4-bit base, LoRA r=64 on all seven projections, batch 2 x accumulation 4. The
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


def run_backend(backend: str, model: str, pairs: Path, root: Path, steps: int, precompute_ref: bool = False) -> dict:
    name = backend + ("-ref" if precompute_ref else "")
    overrides = [f"run.root={root}", f"run.name={name}", f"train.backend={backend}", f"train.base_model={model}",
                 f"train.precompute_ref_log_probs={str(precompute_ref).lower()}",
                 f"train.pairs_dir={pairs}", "train.lora_r=64", "train.per_device_train_batch_size=2",
                 "train.gradient_accumulation_steps=4", f"train.max_steps={steps}", "train.max_length=2048",
                 "train.save_steps=100000", "train.eval_split=0", "train.report_to=[]",
                 "train.load_in_4bit=true", "train.learning_rate=5e-6"]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "trainer.dpo", *overrides], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        print(f"--- {name} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}", flush=True)
        return {"backend": name, "failed": True}
    summary = json.loads((root / name / "round-0" / "adapter" / "train_summary.json").read_text())
    plan = subprocess.run([sys.executable, "-m", "trainer.plan", *overrides, "--gpu-gib", "80"], capture_output=True,
                          text=True)
    est = re.search(r"peak_gib: ([\d.]+)", plan.stdout)
    return {"backend": name, "wall_s": wall, **summary["throughput"], "loss": summary["metrics"].get("loss"),
            "plan_peak_gib": float(est.group(1)) if est else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", type=int, default=112)
    ap.add_argument("--words", type=int, default=300)
    ap.add_argument("--backends", default="peft,unsloth", help="comma list; a '+ref' suffix (unsloth+ref) "
                    "precomputes reference log-probs before training (what pairs scored by the server give)")
    ap.add_argument("--out", default="/tmp/dpo-bench")
    args = ap.parse_args()
    out = Path(args.out)
    pairs = make_pairs(out / "pairs", args.pairs, args.words)
    steps = args.pairs // 8
    results = []
    for b in args.backends.split(","):
        backend, _, ref = b.partition("+")
        res = run_backend(backend, args.model, pairs, out / "runs", steps, precompute_ref=ref == "ref")
        results.append(res)
        print(json.dumps(res), flush=True)
    ok = [r for r in results if not r.get("failed")]
    for r in ok:
        peak = f"{r['peak_vram_gib']:.1f} GiB" if r["peak_vram_gib"] is not None else "n/a (no GPU)"
        print(f"{r['backend']:>8}: {r['pairs_per_s']:.2f} pairs/s per optimizer step (median {r['step_s_median']:.2f}s "
              f"over {r['steps_timed']} steps), peak {peak} (plan: {r['plan_peak_gib']} GiB), "
              f"process wall {r['wall_s']:.0f}s")
    if len(ok) >= 2 and all(r["peak_vram_gib"] for r in ok):
        a = ok[0]  # the first backend is the baseline
        for b in ok[1:]:
            print(f"ratio {b['backend']}/{a['backend']}: {b['pairs_per_s'] / a['pairs_per_s']:.2f}x pairs/s, "
                  f"{b['peak_vram_gib'] / a['peak_vram_gib']:.2f}x peak memory")


if __name__ == "__main__":
    main()
