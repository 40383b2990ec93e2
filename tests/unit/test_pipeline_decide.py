"""The stopping rules of the round loop, on hand-made eval results (no servers, no models)."""

import json
import time

import pytest

from pipeline.run import decide
from shared.config import load_config
from shared.ledger import CostLedger
from shared.rundir import RunDir


def _eval(rd: RunDir, k: int, flags: list[bool]) -> None:
    d = rd.round(k).eval
    d.mkdir(parents=True)
    rows = [{"key": f"k{i}", "instruction_id_list": ["x:y"], "follow_strict": [f], "follow_loose": [f],
             "prompt_strict": f, "prompt_loose": f} for i, f in enumerate(flags)]
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    score = sum(flags) / len(flags)
    (d / "scores.json").write_text(json.dumps({m: score for m in ("prompt_strict", "prompt_loose", "instruction_strict",
                                                                  "instruction_loose")}))


@pytest.fixture
def base_dir(tmp_path):
    d = tmp_path / "base"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _setup(tmp_path, base_dir, *overrides):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=r", f"model.base={base_dir}", "pipeline.rounds=3",
                             "pipeline.min_gain=0.05", *overrides])
    return cfg, RunDir.from_config(cfg)


def test_round_zero_keeps_going_then_max_rounds(tmp_path, base_dir):
    cfg, rd = _setup(tmp_path, base_dir, "pipeline.rounds=1")
    _eval(rd, 0, [True] * 20 + [False] * 80)
    assert decide(cfg, rd, 0) is None
    _eval(rd, 1, [True] * 40 + [False] * 60)
    reason, promoted = decide(cfg, rd, 1)
    assert reason.startswith("max rounds") and promoted == str(rd.round(0).merged)


def test_target_reached(tmp_path, base_dir):
    cfg, rd = _setup(tmp_path, base_dir, "eval.target=0.5")
    _eval(rd, 0, [True] * 60 + [False] * 40)
    reason, promoted = decide(cfg, rd, 0)
    assert reason.startswith("target reached") and promoted == str(base_dir)


def test_significant_regression_rolls_back(tmp_path, base_dir):
    cfg, rd = _setup(tmp_path, base_dir)
    _eval(rd, 0, [True] * 60 + [False] * 40)
    _eval(rd, 1, [True] * 20 + [False] * 80)  # every prompt that passed before now fails
    reason, promoted = decide(cfg, rd, 1)
    assert reason.startswith("regression") and promoted == str(base_dir)  # round 1's model is not promoted


def test_plateau_keeps_the_better_model(tmp_path, base_dir):
    cfg, rd = _setup(tmp_path, base_dir)
    _eval(rd, 0, [True] * 50 + [False] * 50)
    _eval(rd, 1, [True] * 49 + [False] * 51)  # within noise, slightly worse
    reason, promoted = decide(cfg, rd, 1)
    assert reason.startswith("plateau") and promoted == str(base_dir)
    _eval(rd, 2, [True] * 52 + [False] * 48)  # within noise, slightly better than round 1, below min_gain
    reason, promoted = decide(cfg, rd, 2)
    assert reason.startswith("plateau") and promoted == str(rd.round(1).merged)


def test_budget_spent(tmp_path, base_dir):
    cfg, rd = _setup(tmp_path, base_dir, "cost.gpu_usd_per_hour=3600", "cost.budget_usd=0.01")
    _eval(rd, 0, [False] * 10)
    with CostLedger(rd.round(0).ledger, usd_per_hour=3600).stage("pairs"):
        time.sleep(0.02)  # at $1/s, 20 ms spends the $0.01 budget
    reason, _ = decide(cfg, rd, 0)
    assert reason.startswith("budget spent")


def test_pairs_command_for_both_runners(tmp_path, base_dir):
    import sys

    from pipeline.run import pairs_command

    cfg, _ = _setup(tmp_path, base_dir)
    cmd, env = pairs_command(cfg, tmp_path / "config.yaml", 2, "http://127.0.0.1:9", "sekret")
    assert cmd[:3] == [sys.executable, "-m", "pair_builder"] and "pairs.round=2" in cmd
    assert "pairs.servers=[http://127.0.0.1:9]" in cmd and env == {"GEN_SERVER_API_KEY": "sekret"}
    assert not any("sekret" in c for c in cmd)
    cfg, _ = _setup(tmp_path, base_dir, "pipeline.pairs_runner=ray_job", "pairs.ray_address=http://10.0.0.1:8265")
    cmd, env = pairs_command(cfg, tmp_path / "config.yaml", 0, "http://127.0.0.1:9", "sekret")
    assert cmd[1:5] == ["job", "submit", "--address", "http://10.0.0.1:8265"] and env == {}
    assert not any("sekret" in c for c in cmd)
    runtime_env = tmp_path / cmd[cmd.index("--runtime-env") + 1]
    assert json.loads(runtime_env.read_text()) == {"env_vars": {"GEN_SERVER_API_KEY": "sekret"}}
    assert runtime_env.stat().st_mode & 0o777 == 0o600
    assert cmd[cmd.index("--") + 1:][:3] == ["python", "-m", "pair_builder"]
