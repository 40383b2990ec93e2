"""pipeline.plan on every config in configs/, and the refusals: each stage priced from a named measurement,
the memory planner's peak for training, a merge or a server that cannot fit the card, a run past its budget."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.plan import CARDS, MEASURED, plan, refuse_unless_fits, render, shape_for
from shared.config import ConfigError, load_config
from trainer.plan import KNOWN_SHAPES, _estimate_for

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
QWEN = ROOT / "configs" / "qwen2.5-32b-a100.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_is_planned(path):
    cfg = load_config(path, [])
    shape, name = shape_for(cfg)
    pl = plan(cfg, shape, model=name)
    assert [s.name for s in pl.stages] == ["serve start", "eval", "pairs", "train", "merge",
                                           "serve + eval of the new model"]
    assert all(s.sources for s in pl.stages) and all(s.seconds > 0 for s in pl.stages)
    text = render(pl)
    assert text.splitlines()[-1] == "fits: yes" and pl.fits
    if cfg.cost.gpu is None:  # a CPU run: no times nor dollars made up from GPU measurements
        assert pl.card is None and "| train | - |" in text
    else:
        assert pl.card is CARDS[cfg.cost.gpu] and all(s.gpu_gib for s in pl.stages)


def test_the_32b_reference_run():
    cfg = load_config(QWEN, [])
    shape, name = shape_for(cfg)
    assert shape == KNOWN_SHAPES["qwen2.5-32b"] and "known shape" in name
    pl = plan(cfg, shape)
    stages = {s.name: s for s in pl.stages}
    # training: the memory planner's peak at the batch it picks (8 on 80 GB at 2048 tokens, unsloth)
    assert stages["train"].gpu_gib == pytest.approx(_estimate_for(cfg, shape, 8)["peak_gib"])
    assert 50 < stages["train"].gpu_gib < 60
    # the merge holds the whole bf16 model: ~61 GiB on the card and in host RAM, and on disk every round
    assert 60 < stages["merge"].gpu_gib < 70 and stages["merge"].host_gib == pytest.approx(stages["merge"].disk_gib)
    # decoding scaled from the 7B measurement by parameters and by the A100's memory bandwidth, and it says so
    assert any("*scaled*" in s for s in stages["pairs"].sources) and any("A100" in s for s in stages["pairs"].sources)
    assert pl.total_usd == pytest.approx(pl.total_seconds / 3600 * 1.74)
    assert pl.total_usd < cfg.cost.budget_usd and not pl.warnings


def test_a_float32_merge_of_32b_does_not_fit_an_80gb_card_and_the_fix_is_named():
    cfg = load_config(QWEN, ["merge.dtype=float32"])
    pl = plan(cfg, KNOWN_SHAPES["qwen2.5-32b"])
    assert not pl.fits and len(pl.problems) == 1 and "merge.dtype=bfloat16" in pl.problems[0]
    assert render(pl).splitlines()[-1] == "fits: no"
    assert plan(load_config(QWEN, ["merge.dtype=float32", "cost.gpu=h200"]), KNOWN_SHAPES["qwen2.5-32b"]).fits


def test_unquantized_weights_past_the_server_share_and_training_past_the_card():
    cfg = load_config(QWEN, ["server.quantization=none", "server.gpu_memory_utilization=0.5",
                             "train.per_device_train_batch_size=8", "train.backend=peft"])
    problems = plan(cfg, KNOWN_SHAPES["qwen2.5-32b"]).problems
    assert any(p.startswith("serve:") and "fp8" in p for p in problems)
    assert any(p.startswith("train:") and "max_length" in p for p in problems)


def test_past_the_budget_is_flagged_not_refused():
    pl = plan(load_config(QWEN, ["cost.budget_usd=1"]), KNOWN_SHAPES["qwen2.5-32b"])
    assert pl.fits and pl.warnings and "stops cleanly at the budget" in pl.warnings[0]
    assert "over budget:" in render(pl)


def test_every_measurement_names_its_source():
    assert all(p.source and p.value > 0 for p in MEASURED.values())
    assert {k for k, p in MEASURED.items() if "*assumed*" in p.source} == {
        "disk_gb_s", "host_ram_train_gib", "host_ram_serve_gib"}


def test_run_refuses_a_plan_that_does_not_fit_before_anything_starts(tmp_path):
    """A model dir with the 32B shape's config.json and nothing else: the plan refuses it before validation
    would look for weights, and nothing is started or written."""
    model = tmp_path / "qwen32b"
    model.mkdir()
    s = KNOWN_SHAPES["qwen2.5-32b"]
    (model / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": s.hidden, "num_hidden_layers": s.layers,
        "intermediate_size": s.intermediate, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
        "vocab_size": s.vocab}))
    over = [f"model.base={model}", f"run.root={tmp_path / 'runs'}", "merge.dtype=float32"]
    with pytest.raises(ConfigError, match="merge.dtype=bfloat16"):
        refuse_unless_fits(load_config(QWEN, over))
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(QWEN), *over],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "does not fit: merge" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
    r = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--config", str(QWEN), *over],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout.splitlines()[-1] == "fits: no"


def test_replicas_divide_the_pair_building_time():
    one = {s.name: s for s in plan(load_config(QWEN, ["cost.gpu=h200"]), KNOWN_SHAPES["qwen2.5-32b"]).stages}
    two = {s.name: s for s in plan(load_config(QWEN, ["cost.gpu=h200", "server.replicas=2"]),
                                   KNOWN_SHAPES["qwen2.5-32b"]).stages}
    assert two["pairs"].seconds == pytest.approx(one["pairs"].seconds / (2 * 3.88 / 4))
    assert two["eval"].seconds == one["eval"].seconds  # the eval's fan-out is unmeasured: planned on one
