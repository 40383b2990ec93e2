"""Does a habit-contrast pair stop DPO from learning a habit everywhere? A mechanism check that runs on CPU.

    python bench/contrast_probe.py --pairs runs/NAME/round-0/pairs --eval runs/NAME/round-0/eval [--base gemma3-270m]
        [--n 16] [--probes 30] [--lr 2e-4] [--epochs 1]

From a built round (its pairs, with ``.meta/candidates.jsonl``, and its eval's results on the official IFEval):
  * arm A trains on the ``n`` checker pairs that reward all-lowercase where the instruction asked for it;
  * arm B trains on the same pairs plus ``n`` habit-contrast pairs (pair_builder.extras: a cased answer of an
    instruction that did not ask, against itself lowercased);
  * arm H adds half as many contrasts as arm B;
  * arm C adds, on the asked side, minimal pairs too: each checker pair's cased rejected answer lowercased, against
    itself. Both sides then differ only in case, and only the instruction tells them apart.
Both train a fresh LoRA from the base with the same settings (TRL's reference pass; no supplied log-probs).
The probe needs no generation: on the round's eval answers that are cased, it scores each text X and lower(X)
under the base and each arm, and reports the shift of the per-token log-likelihood ratio
    d = [log p(lower X) - log p(X)] / tokens,   shift = d(arm) - d(base)
averaged separately over prompts that asked for lowercase and prompts that did not. A habit learned everywhere
raises the shift on both; a habit learned on request raises it where asked only. Prints each arm's shifts and
their difference (asked minus not asked: the condition learned), arm A being the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LOWER_ID = "change_case:english_lowercase"


def _cased(text: str) -> bool:
    letters = [c for c in text if c.lower() != c.upper()]
    return len(letters) >= 10 and any(c.isupper() for c in letters)


def _probe_texts(eval_dir: Path, template, n: int) -> dict[str, list[tuple[str, str]]]:
    from eval.degeneration import is_looping
    from eval.ifeval import load_ifeval_prompts

    prompt_of = {p["key"]: p["prompt"] for p in load_ifeval_prompts()}
    rows = [json.loads(x) for x in (eval_dir / "results.jsonl").read_text().splitlines()]
    out: dict[str, list[tuple[str, str]]] = {"asked": [], "unasked": []}
    for r in rows:
        x = r.get("response") or ""
        if r.get("finish_reason") != "stop" or not _cased(x) or is_looping(x) or len(x) > 1200:
            continue
        side = "asked" if LOWER_ID in r["instruction_id_list"] else "unasked"
        if len(out[side]) < n:
            out[side].append((template.render(prompt_of[r["key"]]), x))
    return out


def _mean_shift(model, tok, texts: list[tuple[str, str]], base_d: list[float] | None) -> tuple[list[float], float]:
    import torch

    ds = []
    for prompt, x in texts:
        vals = []
        for y in (x.lower(), x):
            p = tok(prompt, return_tensors="pt").input_ids
            full = tok(prompt + y + (tok.eos_token or ""), return_tensors="pt").input_ids
            with torch.no_grad():
                logits = model(full).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, full[0, 1:, None])[:, 0]
            start = p.shape[1] - 1
            vals.append((lp[start:].sum().item(), full.shape[1] - p.shape[1]))
        (lo, nlo), (hi, nhi) = vals
        ds.append(lo / max(nlo, 1) - hi / max(nhi, 1))
    shift = sum(ds) / len(ds) if base_d is None else sum(a - b for a, b in zip(ds, base_d)) / len(ds)
    return ds, shift


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=Path, required=True)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--base", default="gemma3-270m")
    ap.add_argument("--n", type=int, default=16, help="lowercase checker pairs (and as many contrasts in arm B)")
    ap.add_argument("--probes", type=int, default=30, help="eval answers per side (asked / not asked)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--arms", default="A,B,C", help="A: lowercase pairs; B: + as many contrasts; C: B + asked-side minimal "
                    "pairs; H: + half as many contrasts")
    args = ap.parse_args()

    import pandas as pd
    import pyarrow.parquet as pq
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gen_server.models import resolve_model
    from pair_builder.audit import replay_extras
    from pair_builder.extras import rewarded_habits
    from shared.config import load_config
    from shared.prompting import load_template
    from trainer.dpo import train

    base = resolve_model(args.base)
    template = load_template()
    checker = [r for sh in sorted(args.pairs.glob("shard-*.parquet")) for r in pq.read_table(sh).to_pylist()]
    lower = [r for r in checker if LOWER_ID in r["constraints"] and "lowercase" in rewarded_habits(r["chosen"],
                                                                                                     r["rejected"])]
    lower = lower[: args.n]
    contrasts = [r for r in replay_extras(args.pairs, habit_contrast=1.0, stop_pairs=0.0, records=True)["records"]
                 if r["principle_id"] == "contrast:lowercase"]
    contrasts = [c for c in contrasts if c["prompt"]][: len(lower)]
    print(f"arm A: {len(lower)} lowercase checker pairs; arm B: + {len(contrasts)} lowercase contrasts", flush=True)
    probes = _probe_texts(args.eval, template, args.probes)
    print(f"probes: {len(probes['asked'])} asked for lowercase, {len(probes['unasked'])} did not", flush=True)

    cols = ["id", "prompt", "chosen", "rejected", "instruction_id", "constraints", "principle_id", "chosen_passed",
            "rejected_passed", "model", "round"]
    tok = AutoTokenizer.from_pretrained(base)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        base_d = {side: _mean_shift(model, tok, texts, None)[0] for side, texts in probes.items()}
        # arm C: minimal pairs on both sides - where lowercase was asked, the cased rejected answer lowercased
        # against itself; where it was not, the contrasts of arm B
        asked = [{**r, "id": r["id"] + "-asked", "chosen": r["rejected"].lower(), "principle_id": "contrast:asked"}
                 for r in lower if r["rejected"].lower() != r["rejected"]]
        arms = {"A": lower, "B": lower + contrasts, "C": lower + contrasts + asked,
                "H": lower + contrasts[: len(contrasts) // 2]}
        for arm, rows in ((a, arms[a]) for a in args.arms.split(",")):
            root = Path(tmp) / arm
            pairs = root / "run" / "round-0" / "pairs"
            pairs.mkdir(parents=True)
            pd.DataFrame([{k: r[k] for k in cols} for r in rows]).to_parquet(pairs / "shard-00000.parquet")
            cfg = load_config(None, [f"run.root={root}", "run.name=run", f"train.base_model={base}",
                                     "train.backend=peft", "train.load_in_4bit=false", "train.report_to=[]",
                                     "train.lora_r=16", f"train.learning_rate={args.lr}", "train.eval_split=0",
                                     f"train.num_train_epochs={args.epochs}", "train.per_device_train_batch_size=2",
                                     "train.gradient_accumulation_steps=1", "train.max_length=1024",
                                     "train.warmup_ratio=0", "train.save_steps=1000"])
            t0 = time.monotonic()
            res = train(cfg)
            trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), res.adapter_dir).eval()
            results[arm] = {side: _mean_shift(trained, tok, texts, base_d[side])[1] for side, texts in probes.items()}
            print(f"arm {arm}: {res.global_step} steps in {time.monotonic() - t0:.0f} s; shift of "
                  f"log p(lower)/p(cased) per token: asked {results[arm]['asked']:+.4f}, "
                  f"not asked {results[arm]['unasked']:+.4f}", flush=True)
    print()
    for arm, r in results.items():
        print(f"arm {arm}: asked {r['asked']:+.4f}, not asked {r['unasked']:+.4f}, asked - not asked "
              f"{r['asked'] - r['unasked']:+.4f} (the condition learned; 0 = none)")
    if "A" in results and "B" in results and results["A"]["unasked"]:
        print(f"not-asked shift, B / A: {results['B']['unasked'] / results['A']['unasked']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
