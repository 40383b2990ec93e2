"""trainer.dpo + trainer.merge end to end on CPU: a tiny random Llama trains with TRL DPO on 16 hand-made
pairs rendered with the real template; resume, supplied reference log-probs and the verified merge."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.config import load_config
from shared.ledger import CostLedger
from shared.prompting import load_template
from tests.tiny import make_tiny_model, ref_logps
from trainer.dpo import RefLogpsMismatch, train
from trainer.merge import MergeVerificationError, merge_adapter, verify_merged

pytestmark = pytest.mark.integration

TEMPLATE = load_template()
N_PAIRS = 16
# First five DPO losses of the main run (seed 3407, tiny Llama seed 0): recorded once; a change means the
# training path changed (TRL/transformers upgrade, data order, LoRA init, loss), not noise.
PINNED_LOSSES = [0.693147, 0.679894, 0.665381, 0.648197, 0.631156]


def _pairs(n: int = N_PAIRS) -> list[dict]:
    return [
        {
            "id": f"id{i}", "prompt": TEMPLATE.render(f"Write item {i}."), "chosen": f" Yes, item {i} is done.",
            "rejected": f" no{i}", "instruction_id": f"ins{i}", "constraints": "[]", "principle_id": "p1",
            "chosen_passed": 1, "rejected_passed": 0, "model": "tiny", "round": 0,
        }
        for i in range(n)
    ]


def _setup(root: Path, rows: list[dict] | None = None) -> Path:
    model = make_tiny_model(root / "model", seed=0)
    pairs = root / "run" / "round-0" / "pairs"
    pairs.mkdir(parents=True)
    pd.DataFrame(rows or _pairs()).to_parquet(pairs / "shard-00000.parquet")
    return model


def _cfg(root: Path, model: Path, *overrides: str):
    return load_config(None, [
        f"run.root={root}", "run.name=run", f"train.base_model={model}", "train.report_to=[]",
        "train.max_length=1024", "train.lora_r=8", "train.learning_rate=5e-3", "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=1", "train.warmup_ratio=0", "train.gradient_checkpointing=false",
        "train.eval_split=0", *overrides,
    ])


def _losses(train_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (train_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _adapter_weights(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The main run: 10 steps, eval split 0.25 (4 pairs), checkpoints every 5 steps."""
    root = tmp_path_factory.mktemp("dpo")
    model = _setup(root)
    cfg = _cfg(root, model, "train.max_steps=10", "train.save_steps=5", "train.eval_split=0.25",
               "train.early_stopping_patience=null")
    result = train(cfg)
    return root, model, cfg, result


def test_loss_falls_and_rewards_separate(trained):
    _, _, _, result = trained
    assert result.status == "completed" and result.global_step == 10
    losses = _losses(result.train_dir)
    assert len(losses) == 10
    assert losses[-1] < losses[0] - 0.05
    rows = [json.loads(x) for x in (result.train_dir / "metrics.jsonl").read_text().splitlines()]
    acc = [r["rewards/accuracies"] for r in rows if "rewards/accuracies" in r]
    margins = [r["rewards/margins"] for r in rows if "rewards/margins" in r]
    assert acc[-1] > acc[0] and margins[-1] > margins[0]
    assert result.metrics["eval_rewards/accuracies"] >= 0.5


def test_pinned_loss_trajectory(trained):
    losses = _losses(trained[3].train_dir)[: len(PINNED_LOSSES)]
    assert losses == pytest.approx(PINNED_LOSSES, abs=2e-4)


def test_outputs_ledger_and_checkpoints(trained):
    root, _, _, result = trained
    adapter, train_dir = result.adapter_dir, result.train_dir
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer.json").is_file()
    summary = json.loads((adapter / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["template_sha256"] == TEMPLATE.sha256
    for name in ("loss.png", "rewards.png"):
        assert (train_dir / name).read_bytes()[:4] == b"\x89PNG"
    for step in (5, 10):
        ckpt = train_dir / f"checkpoint-{step}"
        assert (ckpt / ".complete").is_file() and (ckpt / "optimizer.pt").is_file()
        assert not (ckpt / "model.safetensors").exists()  # adapter-only
    rec = CostLedger(root / "run" / "round-0" / "ledger.jsonl").records()
    assert rec[0]["stage"] == "train" and rec[0]["status"] == "ok" and rec[0]["steps"] == 10


def test_resume_continues_exactly(trained, tmp_path, caplog):
    """Crash after checkpoint-5: resuming trains steps 6-10 to the very same adapter and losses."""
    root, model, cfg, result = trained
    straight = _adapter_weights(result.adapter_dir)
    straight_losses = _losses(result.train_dir)
    copy = tmp_path / "run"
    shutil.copytree(root / "run", copy)
    shutil.rmtree(copy / "round-0" / "train" / "checkpoint-10")
    shutil.rmtree(copy / "round-0" / "adapter")
    with caplog.at_level(logging.INFO, logger="trainer"):
        resumed = train(cfg.model_copy(update={"run": cfg.run.model_copy(update={"root": tmp_path})}), resume=True)
    assert "resuming from" in caplog.text and "checkpoint-5" in caplog.text
    assert resumed.global_step == 10
    assert _losses(resumed.train_dir) == pytest.approx(straight_losses, abs=1e-5)
    again = _adapter_weights(resumed.adapter_dir)
    assert again.keys() == straight.keys()
    for k in straight:
        torch.testing.assert_close(again[k], straight[k], atol=1e-5, rtol=1e-4)


def test_budget_stops_with_a_checkpoint(tmp_path):
    model = _setup(tmp_path)
    # $3.6M/hour against a $0.001 budget: the first step exhausts it.
    result = train(_cfg(tmp_path, model, "train.max_steps=6", "train.save_steps=100", "cost.gpu_usd_per_hour=3600000",
                        "cost.budget_usd=0.001"))
    assert result.status == "budget" and result.global_step == 1
    assert (result.train_dir / "checkpoint-1" / ".complete").is_file()
    assert json.loads((result.adapter_dir / "train_summary.json").read_text())["status"] == "budget"


def test_supplied_ref_logps_are_used_and_checked(tmp_path):
    model = make_tiny_model(tmp_path / "model", seed=0)
    rows = ref_logps(model, _pairs(8))
    pairs = tmp_path / "run" / "round-0" / "pairs"
    pairs.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(pairs / "shard-00000.parquet")
    result = train(_cfg(tmp_path, model, "train.max_steps=2", "train.save_steps=10"))
    summary = json.loads((result.adapter_dir / "train_summary.json").read_text())
    assert summary["ref_logps"] == "dataset"
    assert summary["ref_check"]["max_abs_diff_per_token"] < 1e-4
    # At step 1 the policy is the reference: supplied values give the same first loss as ln 2.
    assert _losses(result.train_dir)[0] == pytest.approx(0.693147, abs=1e-4)

    for r in rows:  # scored by "another model": off by 0.5 nats per pair
        r["ref_chosen_logps"] -= 0.5
    shutil.rmtree(pairs)
    pairs.mkdir()
    pd.DataFrame(rows).to_parquet(pairs / "shard-00000.parquet")
    with pytest.raises(RefLogpsMismatch, match="ref_check_tolerance"):
        train(_cfg(tmp_path, model, "train.max_steps=2", "train.ref_check_tolerance=1e-3"))
    # LD-DPO weighs the response tails: the supplied whole-response sums cannot be its reference, so the trainer
    # scores its own (the off-by-0.5 values above would otherwise move the first loss away from ln 2)
    shutil.rmtree(tmp_path / "run" / "round-0" / "train", ignore_errors=True)
    shutil.rmtree(tmp_path / "run" / "round-0" / "adapter", ignore_errors=True)
    result = train(_cfg(tmp_path, model, "train.max_steps=2", "train.ld_alpha=0.5"))
    summary = json.loads((result.adapter_dir / "train_summary.json").read_text())
    assert summary["ref_logps"] == "online" and not summary.get("ref_check")
    assert _losses(result.train_dir)[0] == pytest.approx(0.693147, abs=1e-4)


def test_merge_verifies_and_tampering_fails(trained, tmp_path):
    _, model, _, result = trained
    probes = [TEMPLATE.render("Write a poem."), TEMPLATE.render("Say hi.")]
    out = tmp_path / "merged"
    verdict = merge_adapter(model, result.adapter_dir, out, probe_prompts=probes)
    assert verdict["passed"] and verdict["top1_agreement"] == 1.0 and verdict["mean_kl"] < 1e-6
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    # The adapter changed the model: merged != base.
    with pytest.raises(MergeVerificationError):
        verify_merged(model, result.adapter_dir, model, probe_prompts=probes, max_kl=1e-6, min_top1=1.0)

    weights = load_file(out / "model.safetensors")
    key = next(k for k in weights if "layers.1.mlp.down_proj" in k)
    weights[key] = weights[key] + 0.5 * torch.randn_like(weights[key])
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeVerificationError, match="disagrees"):
        verify_merged(model, result.adapter_dir, out, probe_prompts=probes)


def test_sigkill_mid_save_then_resume_finishes(tmp_path):
    """A real `python -m trainer.dpo` SIGKILLed the moment a checkpoint directory appears (mid-save, or just
    after): the torn checkpoint is never resumed from, and `--resume` finishes the run with a complete adapter."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from trainer.hooks import COMPLETE_MARKER

    model = _setup(tmp_path)
    args = [f"run.root={tmp_path}", "run.name=run", f"train.base_model={model}", "train.report_to=[]",
            "train.max_length=1024", "train.lora_r=8", "train.learning_rate=5e-3", "train.per_device_train_batch_size=2",
            "train.gradient_accumulation_steps=1", "train.warmup_ratio=0", "train.gradient_checkpointing=false",
            "train.eval_split=0", "train.max_steps=12", "train.save_steps=2"]
    train_dir = tmp_path / "run" / "round-0" / "train"
    proc = subprocess.Popen([sys.executable, "-m", "trainer.dpo", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (train_dir / "checkpoint-4").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the trainer ended before checkpoint-4: " + proc.stderr.read()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    torn = [p.name for p in train_dir.glob("checkpoint-*") if not (p / COMPLETE_MARKER).exists()]
    print("torn checkpoints:", torn)
    r = subprocess.run([sys.executable, "-m", "trainer.dpo", *args, "--resume"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_from = "checkpoint-4" if "checkpoint-4" not in torn else "checkpoint-2"
    assert f"resuming from {train_dir / resumed_from}" in r.stderr, (torn, r.stderr[-2000:])
    summary = json.loads((tmp_path / "run" / "round-0" / "adapter" / "train_summary.json").read_text())
    assert summary["global_step"] == 12
    assert (tmp_path / "run" / "round-0" / "adapter" / "adapter_model.safetensors").stat().st_size > 0


def test_dpo_plus_sft_term_trains(tmp_path):
    """train.loss_type=[sigmoid, sft] (DPO with an SFT term on chosen, weighted): a real run reports both."""
    model = _setup(tmp_path)
    cfg = _cfg(tmp_path, model, "train.max_steps=3", "train.loss_type=[sigmoid, sft]", "train.loss_weights=[1.0, 0.5]")
    result = train(cfg)
    assert result.global_step == 3 and result.status == "completed"
    losses = _losses(result.train_dir)
    # pure DPO starts at ln 2 = 0.6931 (PINNED_LOSSES); the SFT term adds 0.5 x chosen's NLL on top
    assert losses[0] > PINNED_LOSSES[0] + 0.1 and all(x == x for x in losses)
