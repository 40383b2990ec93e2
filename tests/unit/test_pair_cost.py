"""bench/pair_cost.py on the fifth GPU run's committed ledgers: the measured row is the ledgers' arithmetic."""

import json
from pathlib import Path

import pytest

from bench.pair_cost import main, pairs_stages

RUN = Path(__file__).resolve().parents[2] / "docs" / "runs" / "base-gpu" / "run-5"


def test_cost_per_1000_verified_pairs_from_a_runs_ledgers(capsys):
    ledgers = sorted(RUN.glob("round-*-ledger.jsonl"))
    stages = pairs_stages(ledgers)
    assert len(stages) == 3  # round 3 only served its eval
    pairs = sum(s["accepted_pairs"] for s in stages)
    hours = sum(s["wall_s"] for s in stages) / 3600 / pairs * 1000
    assert main([str(p) for p in ledgers]) == 0
    out = capsys.readouterr().out
    assert f"{pairs} verified pairs" in out and f"| {hours:.3f} |" in out
    rows = [line for line in out.splitlines() if line.startswith("| qwen2.5-")]
    assert len(rows) == 6 and all(" to " in r for r in rows)


def test_a_ledger_without_pairs_is_refused(tmp_path):
    p = tmp_path / "ledger.jsonl"
    p.write_text(json.dumps({"stage": "eval", "status": "ok", "wall_s": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="no successful pairs stage"):
        pairs_stages([p])
