import time

import pytest

from shared.config import load_config
from shared.ledger import CostLedger
from shared.rundir import RunDir


def test_ledger_records_cost_tokens_and_errors(tmp_path):
    led = CostLedger(tmp_path / "ledger.jsonl", usd_per_hour=3600.0)  # $1 per second: easy to check
    with led.stage("pairs", backend="embedded") as st:
        st.add(prompt_tokens=10, completion_tokens=5)
        st.add(completion_tokens=5, accepted_pairs=2)
        time.sleep(0.05)
    with pytest.raises(KeyError):
        with led.stage("dpo"):
            raise KeyError("boom")
    recs = led.records()
    assert [r["stage"] for r in recs] == ["pairs", "dpo"]
    assert recs[0]["status"] == "ok" and recs[1]["status"] == "error"
    assert recs[0]["completion_tokens"] == 10 and recs[0]["accepted_pairs"] == 2
    assert recs[0]["backend"] == "embedded"
    assert recs[0]["cost_usd"] == pytest.approx(recs[0]["wall_s"], rel=0.01)
    assert recs[0]["wall_s"] >= 0.05
    tot = led.totals()
    assert tot["pairs"]["prompt_tokens"] == 10
    assert led.total_usd() == pytest.approx(recs[0]["cost_usd"] + recs[1]["cost_usd"])


def test_rundir_layout_and_config(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=exp"])
    rd = RunDir.from_config(cfg)
    r0 = rd.round(0)
    rd.round(2)
    assert r0.path == tmp_path / "exp" / "round-0"
    assert r0.pairs == r0.path / "pairs" and r0.merged.name == "merged" and r0.ledger.name == "ledger.jsonl"
    assert rd.rounds() == [0, 2]
    assert load_config(rd.save_config(cfg)) == cfg
    with pytest.raises(ValueError):
        rd.round(-1)


def test_spent_covers_every_round_of_the_run(tmp_path):
    rd = RunDir(tmp_path / "run")
    for k in (0, 1):
        with CostLedger(rd.round(k).ledger, usd_per_hour=3600.0).stage("pairs"):
            time.sleep(0.05)
    per_round = [CostLedger(rd.round(k).ledger).total_usd() for k in (0, 1)]
    assert all(x > 0 for x in per_round)
    assert rd.spent_usd() == pytest.approx(sum(per_round))  # what pair_builder, trainer and pipeline compare
