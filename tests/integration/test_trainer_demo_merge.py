"""The packaged demo model (SmolLM2-135M, real weights) through two DPO steps and the verified merge."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from gen_server.models import prepare
from shared.config import load_config
from shared.prompting import load_template
from trainer.dpo import train
from trainer.merge import MergeVerificationError, merge_adapter

pytestmark = pytest.mark.integration


def test_demo_model_trains_and_merges_verified(tmp_path):
    base = prepare("smollm2-135m")
    tpl = load_template()
    rows = [{"id": f"id{i}", "prompt": tpl.render(f"Name a color. Answer in lowercase. ({i})"), "chosen": "blue",
             "rejected": "BLUE", "instruction_id": f"i{i}", "constraints": "[]", "principle_id": "p", "chosen_passed": 1,
             "rejected_passed": 0, "model": "smollm2-135m", "round": 0} for i in range(4)]
    pairs = tmp_path / "run" / "round-0" / "pairs"
    pairs.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(pairs / "shard-00000.parquet")
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=run", f"train.base_model={base}", "train.report_to=[]",
                             "train.max_length=1024", "train.lora_r=8", "train.learning_rate=1e-3", "train.max_steps=2",
                             "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
                             "train.eval_split=0", "train.gradient_checkpointing=false"])
    result = train(cfg)
    assert result.status == "completed" and result.global_step == 2
    probes = [tpl.render("Name a color."), tpl.render("Write a haiku about rain.")]
    # A short run's LoRA update is mostly below bf16's resolution: rounding the merged weights to bf16 drops
    # most of it, and the verification says so instead of passing a merge that lost the adapter.
    with pytest.raises(MergeVerificationError, match="does NOT carry"):
        merge_adapter(base, result.adapter_dir, tmp_path / "merged-bf16", probe_prompts=probes, dtype="bfloat16")
    assert not (tmp_path / "merged-bf16").exists()
    out = tmp_path / "merged"
    report = merge_adapter(base, result.adapter_dir, out, probe_prompts=probes, dtype="float32")
    assert report["passed"] and report["carries_adapter"] and report["mean_kl"] < 1e-4, report
    merged, orig = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    key = next(k for k in merged if k.endswith("q_proj.weight"))
    assert merged[key].dtype == torch.float32 and not torch.equal(merged[key], orig[key].float())
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2
