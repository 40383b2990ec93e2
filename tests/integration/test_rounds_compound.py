"""Rounds compound: round 1 starts from the policy round 0 produced, on the training side as on the serving side.

A tiny random Llama trains round 0 (real DPO steps), round 0's adapter is merged (as the server would serve it),
round 1's pairs carry reference log-probs scored on that merge (as the server scores them), and round 1 trains.
With ``train.continue_adapter`` (the default) round 1's starting policy is round 0's policy - it carries all of
round 0's movement away from the base - and its DPO reference is that same policy, so the supplied reference
log-probs match the trainer's own. The old scheme (a fresh LoRA whose reference is the adapter-disabled model)
is shown failing the same reference check when trained over the original base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from shared.config import load_config
from shared.prompting import load_template
from tests.tiny import make_tiny_model, ref_logps
from trainer.dpo import RefLogpsMismatch, train
from trainer.merge import merge_for_config

pytestmark = pytest.mark.integration

TEMPLATE = load_template()


def _pairs(rnd: int, n: int = 12) -> list[dict]:
    return [
        {"id": f"r{rnd}-{i}", "prompt": TEMPLATE.render(f"Write item {i} of round {rnd}."),
         "chosen": f" Yes, item {i} is done.", "rejected": f" no{i}", "instruction_id": f"ins{i}",
         "constraints": "[]", "principle_id": "p1", "chosen_passed": 1, "rejected_passed": 0, "model": "tiny",
         "round": rnd}
        for i in range(n)
    ]


def _write_pairs(root: Path, rnd: int, rows: list[dict]) -> None:
    d = root / "run" / f"round-{rnd}" / "pairs"
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(d / "shard-00000.parquet")


def _cfg(root: Path, base: Path, rnd: int, *overrides: str):
    return load_config(None, [
        f"run.root={root}", "run.name=run", f"model.base={base}", f"train.round={rnd}", "train.report_to=[]",
        "train.max_length=1024", "train.lora_r=8", "train.learning_rate=5e-3", "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=1", "train.warmup_ratio=0", "train.gradient_checkpointing=false",
        "train.eval_split=0", "train.save_steps=100", "merge.dtype=float32", *overrides,
    ])


@pytest.fixture(scope="module")
def round0(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    base = make_tiny_model(root / "base", seed=0)
    _write_pairs(root, 0, _pairs(0))
    train(_cfg(root, base, 0, "train.max_steps=8"))
    verdict = merge_for_config(_cfg(root, base, 0))
    return root, base, verdict


def test_round1_starts_from_round0_policy_and_its_reference(round0):
    root, base, merge0 = round0
    moved = merge0["adapter_effect_kl"]  # KL(round-0 policy || base) on the merge probes
    assert moved > 1e-3, "round 0 must move the model for the test to mean anything"
    # Round 1's pairs carry reference log-probs scored on round 0's merge, as the server does.
    _write_pairs(root, 1, ref_logps(root / "run" / "round-0" / "merged", _pairs(1)))
    cfg1 = _cfg(root, base, 1, "train.max_steps=2")
    result = train(cfg1)
    summary = json.loads((result.adapter_dir / "train_summary.json").read_text())
    assert summary["init_adapter"] == str(root / "run" / "round-0" / "adapter")
    assert summary["base_model"] == str(base)  # the ORIGINAL base, never a merge loaded again
    # The starting policy carries (all of) round 0's movement: >= 90% is the bar.
    assert summary["start_kl_to_base"] >= 0.9 * moved
    assert summary["start_kl_to_base"] == pytest.approx(moved, rel=0.05)
    # The trainer's reference is round 0's policy: the server-scored log-probs match it.
    assert summary["ref_logps"] == "dataset" and summary["ref_check"]["max_abs_diff_per_token"] < 1e-4
    # Step 1: policy == reference, so the DPO loss is ln 2 exactly.
    first = next(json.loads(x)["loss"] for x in (result.train_dir / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(x))
    assert first == pytest.approx(0.693147, abs=1e-4)

    # The cumulative adapter merges into the ORIGINAL base and carries both rounds' movement.
    merge1 = merge_for_config(cfg1)
    assert merge1["passed"] and merge1["base_model"] == str(base)
    assert merge1["adapter_effect_kl"] > 0.5 * moved


def test_fresh_lora_over_the_base_has_the_wrong_reference(round0):
    """Without continue_adapter, a LoRA over the original base would be referenced to the base itself, not to
    round 0's policy: the reference check catches it (this is why continuing needs the 'ref' adapter)."""
    root, base, _ = round0
    _write_pairs(root, 1, ref_logps(root / "run" / "round-0" / "merged", _pairs(1)))
    cfg = _cfg(root, base, 1, "train.max_steps=1", "train.continue_adapter=false", f"train.base_model={base}",
               "train.ref_check_tolerance=1e-3", f"train.output_dir={root / 'fresh' / 'adapter'}")
    with pytest.raises(RefLogpsMismatch):
        train(cfg)


def test_continue_refuses_another_lora_shape(round0):
    root, base, _ = round0
    _write_pairs(root, 1, _pairs(1))
    from shared.config import ConfigError

    with pytest.raises(ConfigError, match="lora_r"):
        train(_cfg(root, base, 1, "train.max_steps=1", "train.lora_r=4",
                   f"train.output_dir={root / 'other' / 'adapter'}"))
