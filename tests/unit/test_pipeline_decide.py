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
    cmd, env = pairs_command(cfg, tmp_path / "config.yaml", 2, ["http://127.0.0.1:9"], "sekret")
    assert cmd[:3] == [sys.executable, "-m", "pair_builder"] and "pairs.round=2" in cmd
    assert "pairs.servers=[http://127.0.0.1:9]" in cmd and env == {"GEN_SERVER_API_KEY": "sekret"}
    assert not any("sekret" in c for c in cmd)
    cfg, _ = _setup(tmp_path, base_dir, "pipeline.pairs_runner=ray_job", "pairs.ray_address=http://10.0.0.1:8265")
    two, _ = pairs_command(cfg, tmp_path / "config.yaml", 2, ["http://127.0.0.1:9", "http://127.0.0.1:10"], "k")
    assert "pairs.servers=[http://127.0.0.1:9,http://127.0.0.1:10]" in two  # one replica each
    cmd, env = pairs_command(cfg, tmp_path / "config.yaml", 0, ["http://127.0.0.1:9"], "sekret")
    assert cmd[1:5] == ["job", "submit", "--address", "http://10.0.0.1:8265"] and env == {}
    assert not any("sekret" in c for c in cmd)
    runtime_env = tmp_path / cmd[cmd.index("--runtime-env") + 1]
    assert json.loads(runtime_env.read_text()) == {"env_vars": {"GEN_SERVER_API_KEY": "sekret"}}
    assert runtime_env.stat().st_mode & 0o777 == 0o600
    assert cmd[cmd.index("--") + 1:][:3] == ["python", "-m", "pair_builder"]


# --- promotion guards: degeneration within bounds of round 0, held-out types not falling -----------------

ESSAY = ("Tides are the regular rise and fall of the sea. They are caused mainly by the gravity of the Moon, "
         "which pulls the water on the near side of the Earth towards it, and by the rotation of the Earth. "
         "The Sun also plays a part: when the Sun and the Moon line up, at new and full moon, the tides are "
         "higher than usual; these are called spring tides.")
LONG = ESSAY + (" Neap tides happen when the Sun and the Moon pull at right angles to each other, so the "
                "difference between high and low water is smaller. Most coasts see two high tides and two low tides "
                "each day, about twelve hours and twenty-five minutes apart, because the Moon moves along its orbit "
                "while the Earth turns. Local shape matters too: a funnel-shaped bay such as the Bay of Fundy can "
                "amplify the range to more than fifteen metres, while enclosed seas like the Mediterranean barely "
                "notice the tide at all. Sailors, fishers and engineers read tide tables to plan their work.")
LOOP = "Ideas for a party:\n" + "* ice cube in the shape of a shaker\n" * 40
HELD = "startend:quotation"  # one of the default held-out types


def _guarded_eval(rd, k, score, *, heldout=0.5, trunc=0.0, loop=0.0, lower=0.0, text=ESSAY, fewshot=None):
    """100 prompts: each asks keywords:existence (followed by the first `score` share); every 4th also asks a
    held-out type (followed by the first `heldout` share of those). Response habits by share of prompts;
    ``fewshot`` None: rows without the field (an eval from before the habit was recorded)."""
    rows = []
    for i in range(100):
        ids, follow = ["keywords:existence"], [i < score * 100]
        if i % 4 == 0:
            ids.append(HELD)
            follow.append(i // 4 < heldout * 25)
        resp = text
        if i >= 100 - loop * 100:
            resp = LOOP
        elif 50 <= i < 50 + lower * 100:
            resp = text.lower()
        rows.append({"key": f"k{i}", "instruction_id_list": ids, "follow_strict": follow, "follow_loose": follow,
                     "prompt_strict": all(follow), "prompt_loose": all(follow),
                     "finish_reason": "length" if i < trunc * 100 else "stop", "response": resp})
        if fewshot is not None:
            rows[-1]["fewshot"] = 20 <= i < 20 + fewshot * 100
    d = rd.round(k).eval
    d.mkdir(parents=True)
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flat = [f for r in rows for f in r["follow_strict"]]
    prompt = sum(r["prompt_strict"] for r in rows) / len(rows)
    (d / "scores.json").write_text(json.dumps({"prompt_strict": prompt, "prompt_loose": prompt,
                                               "instruction_strict": sum(flat) / len(flat),
                                               "instruction_loose": sum(flat) / len(flat)}))


def test_guards_pass_a_healthy_gain(tmp_path, base_dir):
    cfg, rd = _setup(tmp_path, base_dir)
    _guarded_eval(rd, 0, 0.2, trunc=0.1, loop=0.01)
    assert decide(cfg, rd, 0) is None
    _guarded_eval(rd, 1, 0.5, heldout=0.6, trunc=0.15, loop=0.03, lower=0.1)  # every measure at its bound
    assert decide(cfg, rd, 1) is None


@pytest.mark.parametrize("kwargs, names, relax", [
    ({"trunc": 0.2}, ["truncation_rate 0.200 vs 0.000 in round 0 (+0.200 > pipeline.guards.max_truncation_rise=0.05)"],
     "pipeline.guards.max_truncation_rise=0.25"),
    ({"loop": 0.05}, ["loop_rate 0.050 vs 0.000 in round 0", "max_loop_rise=0.02"], "pipeline.guards.max_loop_rise=0.1"),
    ({"lower": 0.3}, ["lowercase_rate 0.300 vs 0.000 in round 0", "max_habit_rise=0.1"],
     "pipeline.guards.max_habit_rise=0.4"),
    ({"fewshot": 0.3}, ["fewshot_rate 0.300 vs 0.000 in round 0", "max_habit_rise=0.1"],
     "pipeline.guards.max_habit_rise=0.4"),
    ({"text": LONG}, ["words_median 173 vs 70 in round 0 (2.5x > pipeline.guards.max_length_ratio=2.0)"],
     "pipeline.guards.max_length_ratio=2.5"),
    ({"text": "Tides rise and fall twice a day."}, ["words_median 7 vs 70 in round 0 (1/10.0x < "
                                                    "1/pipeline.guards.max_length_ratio=1/2.0)"],
     "pipeline.guards.max_length_ratio=11"),
    ({"heldout": 0.2}, ["held-out types' instruction_loose 0.200 vs 0.520 in round 0 (-0.320, 95% CI -0.", "25 instructions"],
     "pipeline.guards.heldout_tolerance=0.35"),
])
def test_each_guard_refuses_promotion_and_names_the_numbers(tmp_path, base_dir, kwargs, names, relax):
    cfg, rd = _setup(tmp_path, base_dir)
    _guarded_eval(rd, 0, 0.2, heldout=0.52, fewshot=0.0 if "fewshot" in kwargs else None)
    _guarded_eval(rd, 1, 0.6, **{"heldout": 0.52, **kwargs})
    reason, promoted = decide(cfg, rd, 1)
    assert reason.startswith("guard failed: round 1 (prompt_loose 0.5") and "over round 0) is not promoted: " in reason
    for n in names:
        assert n in reason, reason
    assert "round 0's model is kept" in reason and promoted == str(base_dir)
    cfg, rd = _setup(tmp_path, base_dir, relax)
    assert decide(cfg, rd, 1) is None
    cfg, rd = _setup(tmp_path, base_dir, "pipeline.guards.enabled=false")
    assert decide(cfg, rd, 1) is None


def test_a_habit_round_0_did_not_record_is_skipped_not_an_error(tmp_path, base_dir):
    # round 0 scored before the few-shot habit existed (no `fewshot` in its rows): nothing to compare with
    cfg, rd = _setup(tmp_path, base_dir)
    _guarded_eval(rd, 0, 0.2)
    _guarded_eval(rd, 1, 0.6, fewshot=0.3)
    assert decide(cfg, rd, 1) is None


def test_heldout_compares_with_the_previous_round_too(tmp_path, base_dir):
    cfg, rd = _setup(tmp_path, base_dir)
    _guarded_eval(rd, 0, 0.2, heldout=0.4)
    _guarded_eval(rd, 1, 0.4, heldout=0.8)
    assert decide(cfg, rd, 1) is None
    _guarded_eval(rd, 2, 0.6, heldout=0.6)  # still above round 0, but below round 1
    reason, promoted = decide(cfg, rd, 2)
    assert "0.600 vs 0.800 in round 1" in reason and "in round 0" not in reason
    assert "round 1's model is kept" in reason and promoted == str(rd.round(0).merged)


def test_rollback_goes_to_the_best_earlier_round_that_passed(tmp_path, base_dir):
    # round 1 failed its guards but the run went on (e.g. continued with guards off, then on again)
    cfg, rd = _setup(tmp_path, base_dir)
    _guarded_eval(rd, 0, 0.2)
    _guarded_eval(rd, 1, 0.6, loop=0.3)
    _guarded_eval(rd, 2, 0.7, loop=0.3)
    reason, promoted = decide(cfg, rd, 2)
    assert reason.startswith("guard failed") and "round 0's model is kept" in reason and promoted == str(base_dir)


def test_measures_use_the_configured_heldout_types_and_strict_level(tmp_path, base_dir):
    # with keywords:existence held out, its drop from 0.5 to 0.4 is what the guard sees
    cfg, rd = _setup(tmp_path, base_dir, "eval.heldout_types=[keywords:existence]",
                     "eval.gate_metric=instruction_strict", "pipeline.min_gain=0.0")
    _guarded_eval(rd, 0, 0.5, heldout=0.0)
    _guarded_eval(rd, 1, 0.4, heldout=1.0)  # more instructions followed overall, fewer of the held-out type
    reason, promoted = decide(cfg, rd, 1)
    assert "held-out types' instruction_strict 0.400 vs 0.500 in round 0" in reason and promoted == str(base_dir)


def test_a_tie_is_not_a_rise(tmp_path, base_dir):
    cfg, rd = _setup(tmp_path, base_dir, "pipeline.rounds=1")
    _eval(rd, 0, [True] * 50 + [False] * 50)
    _eval(rd, 1, [True] * 50 + [False] * 50)
    reason, promoted = decide(cfg, rd, 1)
    assert reason.startswith("plateau") and promoted == str(base_dir)
    assert "round 1 did not raise prompt_loose (+0.0000): round 0's model is kept" in reason
    cfg, rd = _setup(tmp_path, base_dir, "pipeline.rounds=1", "pipeline.min_gain=0")
    reason, promoted = decide(cfg, rd, 1)
    assert reason.startswith("max rounds") and "round 0's model is kept" in reason and promoted == str(base_dir)


def test_a_clean_gate_metric_ignores_passes_by_loops(tmp_path, base_dir):
    # round 1 "follows" more prompts than round 0, but only with answers that loop to max_tokens
    cfg, rd = _setup(tmp_path, base_dir, "eval.gate_metric=prompt_loose_clean", "pipeline.guards.enabled=false")
    _guarded_eval(rd, 0, 0.2)
    _guarded_eval(rd, 1, 0.6, trunc=0.5)  # 50 of its 60 followed prompts ran to max_tokens
    reason, promoted = decide(cfg, rd, 1)
    assert "prompt_loose_clean" in reason and promoted == str(base_dir)
    cfg, rd = _setup(tmp_path, base_dir, "pipeline.guards.enabled=false")
    assert decide(cfg, rd, 1) is None  # on the official metric the loops count


def test_a_heldout_drop_inside_the_noise_does_not_refuse_the_round(tmp_path, base_dir):
    # 3 of 25 held-out instructions fail after passing: -0.12, but a paired interval that reaches 0
    cfg, rd = _setup(tmp_path, base_dir)
    _guarded_eval(rd, 0, 0.2, heldout=0.52)
    _guarded_eval(rd, 1, 0.6, heldout=0.4)
    assert decide(cfg, rd, 1) is None
