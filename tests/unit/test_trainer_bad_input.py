"""trainer bad input: a merge into the wrong base is refused with the fix named; OOM names the planner's batch."""

from __future__ import annotations

import json
import shutil

import pytest

from shared.config import load_config
from trainer.artifacts import SUMMARY_NAME, base_fingerprint
from trainer.models import oom_message
from trainer.merge import MergeError, check_adapter_matches_base


def _adapter_for(base, out):
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (out / SUMMARY_NAME).write_text(json.dumps({"base_fingerprint": base_fingerprint(base)}))
    return out


def test_merge_refuses_an_adapter_of_another_base(tiny_model_dir, tmp_path):
    adapter = _adapter_for(tiny_model_dir, tmp_path / "adapter")
    check_adapter_matches_base(tiny_model_dir, adapter)  # its own base: fine
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="merge it into the model it was trained on"):
        check_adapter_matches_base(other, adapter)


def test_merge_refuses_a_quantized_base_and_a_missing_adapter(tiny_model_dir, tmp_path):
    adapter = _adapter_for(tiny_model_dir, tmp_path / "adapter")
    q = tmp_path / "q"
    shutil.copytree(tiny_model_dir, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="ORIGINAL 16-bit"):
        check_adapter_matches_base(q, adapter)
    with pytest.raises(MergeError, match=r"run the round.s trainer \(`python -m trainer.dpo"):
        check_adapter_matches_base(tiny_model_dir, tmp_path / "nowhere")


def test_oom_message_names_the_planners_batch(tiny_model_dir):
    msg = oom_message(load_config(None, ["train.max_length=256"]), tiny_model_dir, batch_size=64)
    assert "per_device_train_batch_size=64" in msg
    assert "the planner suggests per_device_train_batch_size=8" in msg and "python -m trainer.plan" in msg
