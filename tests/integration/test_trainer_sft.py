"""trainer.sft end to end on CPU: a tiny random Llama learns the chosen answers of hand-made pairs with TRL's
SFTTrainer (and never the rejected ones), through the same recipe steps, outputs and merge as DPO."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from shared.prompting import load_template
from tests.integration.test_trainer_dpo import _cfg, _losses, _pairs, _setup
from trainer.merge import merge_adapter
from trainer.sft import chosen_answers, train

pytestmark = pytest.mark.integration

TEMPLATE = load_template()


def _mean_logp(model, tokenizer, prompt: str, answer: str) -> float:
    """Mean log-prob per token of ``answer`` after ``prompt``."""
    p = tokenizer(prompt, return_tensors="pt").input_ids
    full = tokenizer(prompt + answer, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(full).logits[0, :-1].float().log_softmax(-1)
    tgt = full[0, 1:]
    lp = logits.gather(-1, tgt[:, None])[:, 0]
    return lp[p.shape[1] - 1:].mean().item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    rows = _pairs()
    model = _setup(root, rows)
    cfg = _cfg(root, model, "train.method=sft", "train.learning_rate=2e-2", "train.max_steps=24", "train.save_steps=12",
               "train.eval_split=0.25", "train.early_stopping_patience=null")
    return root, model, cfg, train(cfg), rows


def test_chosen_answers_dedupes_and_drops_the_rejected_side():
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": "P", "chosen": "a", "rejected": "x"}, {"prompt": "P", "chosen": "a",
                            "rejected": "y"}, {"prompt": "Q", "chosen": "a", "rejected": "x"}])
    out = chosen_answers(ds)
    assert out.column_names == ["prompt", "completion"] and out.to_list() == [
        {"prompt": "P", "completion": "a"}, {"prompt": "Q", "completion": "a"}]


def test_the_answers_are_learned_and_the_rejected_ones_are_not(trained):
    root, model, cfg, result, rows = trained
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert result.status == "completed" and result.global_step == 24
    assert not (result.train_dir / "rewards.png").exists() and (result.train_dir / "loss.png").exists()
    losses = _losses(result.train_dir)
    assert losses[-1] < losses[0]
    tok = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    before = [_mean_logp(base, tok, r["prompt"], r["chosen"]) for r in rows[:8]]
    before_rej = [_mean_logp(base, tok, r["prompt"], r["rejected"]) for r in rows[:8]]
    tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    after = [_mean_logp(tuned, tok, r["prompt"], r["chosen"]) for r in rows[:8]]
    after_rej = [_mean_logp(tuned, tok, r["prompt"], r["rejected"]) for r in rows[:8]]
    gain = sum(a - b for a, b in zip(after, before)) / 8
    rej_gain = sum(a - b for a, b in zip(after_rej, before_rej)) / 8
    # measured: +0.47 nats/token on the chosen answers, -0.06 on the rejected ones (never trained on)
    assert gain > 0.3 and rej_gain < gain - 0.3, (gain, rej_gain)


def test_summary_ledger_and_merge(trained, tmp_path):
    root, model, cfg, result, rows = trained
    summary = json.loads((result.adapter_dir / "train_summary.json").read_text())
    # 16 pairs, 4 held out: 12 answers to train on
    assert summary["method"] == "sft" and summary["pairs"] == 12 and summary["train_pairs"] == 12
    assert summary["eval_pairs"] == 4 and "eval_loss" in summary["metrics"]
    ledger = [json.loads(x) for x in (root / "run" / "round-0" / "ledger.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["method"], e["steps"]) for e in ledger] == [("train", "sft", 24)]
    verdict = merge_adapter(model, result.adapter_dir, tmp_path / "merged",
                            probe_prompts=[TEMPLATE.render("Write item 3.")])
    assert verdict["passed"] and verdict["mean_kl"] < 1e-6


def test_cli_exit_codes(tmp_path):
    model = _setup(tmp_path)
    args = ["train.method=sft", f"run.root={tmp_path}", "run.name=run", f"train.base_model={model}",
            "train.report_to=[]", "train.max_steps=1"]
    bad = subprocess.run([sys.executable, "-m", "trainer.sft", *args, "train.learning_rate=-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "learning_rate" in bad.stderr
    pd.DataFrame([{**_pairs(1)[0], "chosen": ""}]).to_parquet(tmp_path / "run/round-0/pairs/shard-00000.parquet")
    refused = subprocess.run([sys.executable, "-m", "trainer.sft", *args], capture_output=True, text=True)
    assert refused.returncode == 1 and "empty" in refused.stderr
