"""trainer.hooks and trainer.dpo's pre-flight checks, without training."""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from shared.config import ConfigError, load_config
from shared.prompting import load_template
from trainer.data import PairsDataError
from trainer.dpo import train
from trainer.hooks import (
    COMPLETE_MARKER,
    CostCallback,
    EagerLogProbFunction,
    NonFiniteLossCallback,
    RewardEarlyStopping,
    last_complete_checkpoint,
)


@pytest.fixture
def args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)


def test_nan_loss_stops_without_saving(args):
    cb, state, control = NonFiniteLossCallback(), TrainerState(global_step=7), TrainerControl(should_save=True)
    cb.on_log(args, state, control, logs={"loss": 0.5})
    assert not control.should_training_stop and cb.bad_step is None
    cb.on_log(args, state, control, logs={"loss": float("nan")})
    assert control.should_training_stop and not control.should_save and cb.bad_step == 7


def test_budget_stops_with_a_checkpoint(args):
    cb = CostCallback(usd_per_hour=3600.0, budget_usd=1.0, spent_before_usd=0.99)
    control = TrainerControl()
    cb.on_train_begin(args, TrainerState(), control)
    cb.started -= 1.0  # one second at $1/s
    cb.on_step_end(args, TrainerState(global_step=3), control)
    assert cb.budget_hit and control.should_training_stop and control.should_save


def test_no_budget_never_stops(args):
    cb, control = CostCallback(1.74, None, 0.0), TrainerControl()
    cb.on_step_end(args, TrainerState(global_step=1), control)
    assert not control.should_training_stop


def test_early_stopping_on_reward_accuracy(args):
    cb, control = RewardEarlyStopping("rewards/accuracies", patience=2), TrainerControl()
    for step, acc in [(10, 0.5), (20, 0.7), (30, 0.7), (40, 0.6)]:
        cb.on_evaluate(args, TrainerState(global_step=step), control, metrics={"eval_rewards/accuracies": acc})
    assert control.should_training_stop and cb.stopped_at == 40 and cb.best == 0.7


def test_early_stopping_on_a_loss_that_must_fall(args):
    cb, control = RewardEarlyStopping("loss", patience=2, greater_is_better=False), TrainerControl()
    for step, loss in [(10, 2.0), (20, 1.5), (30, 1.6)]:
        cb.on_evaluate(args, TrainerState(global_step=step), control, metrics={"eval_loss": loss})
    assert not control.should_training_stop and cb.best == 1.5
    cb.on_evaluate(args, TrainerState(global_step=40), control, metrics={"eval_loss": 1.5})
    assert control.should_training_stop and cb.stopped_at == 40


def test_last_complete_checkpoint_skips_torn_ones(tmp_path):
    for step in (5, 10, 15):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("x")
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-10"
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_eager_logprobs_match_log_softmax():
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8), torch.randint(0, 20, (6,))
    logp, entropy, lssp, mean_logits, top1 = EagerLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, 4096, None, 1.0, ("entropy", "is_top1"))
    want = (hidden @ weight.T).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, want)
    assert lssp is None and mean_logits is None and top1.dtype == torch.bool and entropy.shape == (6,)
    logp.sum().backward()
    assert hidden.grad is not None and math.isfinite(hidden.grad.sum().item())


def _cfg(tmp_path, model, *extra):
    return load_config(None, [f"run.root={tmp_path}", f"train.base_model={model}", "train.report_to=[]",
                              "train.max_length=2048", *extra])


def test_bad_pairs_are_refused_before_the_model_loads(tmp_path, tiny_model_dir, caplog):
    pairs = tmp_path / "demo" / "round-0" / "pairs"
    pairs.mkdir(parents=True)
    row = {"id": "a", "prompt": "not the template", "chosen": "x", "rejected": "x"}
    pd.DataFrame([row]).to_parquet(pairs / "s.parquet")
    with caplog.at_level(logging.WARNING), pytest.raises(PairsDataError, match="--force") as e:
        train(_cfg(tmp_path, tiny_model_dir, "train.lora_alpha=16"))
    assert "identical" in str(e.value) and "template" in str(e.value)
    assert "original plan's alpha=16" in caplog.text


def test_missing_pairs_dir_names_the_fix(tmp_path, tiny_model_dir):
    with pytest.raises(PairsDataError, match="pair_builder"):
        train(_cfg(tmp_path, tiny_model_dir))


def test_missing_tracker_is_a_config_error(tmp_path, tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("wandb") else real(name, *a))
    with pytest.raises(ConfigError, match="wandb"):
        train(_cfg(tmp_path, tiny_model_dir, "train.report_to=[wandb]"))


def test_template_frame_matches_render():
    from trainer.data import template_frame

    t = load_template()
    prefix, suffix = template_frame(t)
    rendered = t.render("Do a thing.")
    assert rendered.startswith(prefix) and rendered.endswith(suffix) and suffix.endswith(t.answer_prefix)


def test_wait_for_gpu_waits_for_a_stopping_server_then_refuses_one_that_stays():
    from trainer.recipe import GPUBusy, wait_for_gpu

    gib = 2**30
    readings = iter([(10 * gib, 80 * gib), (30 * gib, 80 * gib), (75 * gib, 80 * gib)])  # a server letting go
    slept = []
    assert wait_for_gpu(50, 60, mem_get_info=lambda: next(readings), sleep=slept.append) == 75
    assert slept == [2.0, 2.0]
    with pytest.raises(GPUBusy, match=r"10\.0 GiB free of 80\.0, training needs about 50\.0.*train\.gpu_wait_s"):
        wait_for_gpu(50, 0, mem_get_info=lambda: (10 * gib, 80 * gib), sleep=slept.append)


def test_auto_save_steps_checkpoint_and_evaluate_a_round_of_any_size_four_times(tmp_path):
    from types import SimpleNamespace

    from shared.config import load_config
    from trainer.recipe import Round, round_steps, training_args

    def args(n_pairs, *over):
        cfg = load_config(None, ["train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=4",
                                 "train.num_train_epochs=1", *over])
        r = Round(cfg, "peft", SimpleNamespace(train_dir=tmp_path), None, None, list(range(n_pairs)), [0], 8)
        return round_steps(r), training_args(r)

    steps, a = args(450)  # the 32B config's round: ~450 pairs, effective batch 32 -> 15 steps
    assert steps == 15 and a["save_steps"] == 3 and a["eval_steps"] == 3
    steps, a = args(20)
    assert steps == 1 and a["save_steps"] == 1
    assert args(450, "train.save_steps=50")[1]["save_steps"] == 50  # a number is kept as given
    assert args(450, "train.max_steps=40")[1]["save_steps"] == 10
