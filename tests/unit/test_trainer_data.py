"""trainer.data: every bad-data case is caught before a model loads, and a clean set passes."""

from __future__ import annotations

import pandas as pd
import pytest

from shared.prompting import load_template
from trainer.data import PairsDataError, load_pairs, validate_pairs
from tests.tiny import make_tokenizer

TEMPLATE = load_template()


def _rows(n: int = 6) -> list[dict]:
    return [
        {
            "id": f"id{i}", "prompt": TEMPLATE.render(f"Say number {i}."), "chosen": f" {i} is the number.",
            "rejected": f"No {i}", "instruction_id": f"ins{i}", "constraints": "[]", "principle_id": "p1",
            "chosen_passed": 1, "rejected_passed": 0, "model": "m", "round": 0,
        }
        for i in range(n)
    ]


def _write(tmp_path, rows, name="pairs") -> str:
    d = tmp_path / name
    d.mkdir()
    pd.DataFrame(rows).to_parquet(d / "shard-00000.parquet")
    return d


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _checks(report, severity="error"):
    return {p.check for p in report.problems if p.severity == severity}


def _validate(tmp_path, rows, tok, name="pairs", **kw):
    kw.setdefault("max_length", 4096)
    return validate_pairs(_write(tmp_path, rows, name), tok, template=TEMPLATE, expected_round=0, **kw)


def test_clean_pairs_pass(tmp_path, tok):
    report = _validate(tmp_path, _rows(), tok)
    assert report.ok, report.summary()
    assert report.rows == 6 and report.stats["prompt_tokens_max"] > 0
    report.print_table()  # renders without error


def test_missing_column(tmp_path, tok):
    rows = [{k: v for k, v in r.items() if k != "rejected"} for r in _rows()]
    report = _validate(tmp_path, rows, tok)
    assert "schema" in _checks(report) and "rejected" in report.summary()


def test_wrong_type(tmp_path, tok):
    rows = _rows()
    for r in rows:
        r["round"] = "zero"
    assert "schema" in _checks(_validate(tmp_path, rows, tok))


def test_empty_identical_duplicates(tmp_path, tok):
    rows = _rows(8)
    rows[0]["chosen"] = "   "
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[2] = dict(rows[3], id="other")  # same (prompt, chosen, rejected) as row 3
    rows[4]["id"] = rows[5]["id"]
    report = _validate(tmp_path, rows, tok)
    assert {"empty", "identical", "duplicate_pair", "duplicate_id"} <= _checks(report)
    assert not report.ok


def test_wrong_template_and_round(tmp_path, tok):
    rows = _rows()
    rows[0]["prompt"] = "Q: say a number\nA:"
    rows[1]["round"] = 3
    report = _validate(tmp_path, rows, tok)
    assert {"template", "round"} <= _checks(report)
    assert "id0" in next(p for p in report.problems if p.check == "template").examples


def test_over_long(tmp_path, tok):
    rows = _rows()
    rows[0]["chosen"] = " word" * 400
    prompt_tokens = len(tok(rows[1]["prompt"])["input_ids"])
    report = _validate(tmp_path, rows, tok, max_length=prompt_tokens + 30, max_prompt_length=10)
    assert "response_truncated" in _checks(report)
    assert "prompt_too_long" in _checks(report, "warning")
    # A prompt that alone fills max_length would be dropped by TRL.
    report = _validate(tmp_path, rows, tok, name="pairs2", max_length=prompt_tokens - 5)
    assert "prompt_fills_max_length" in _checks(report)


def test_truncation_under_the_limit_is_a_warning(tmp_path, tok):
    rows = _rows(20)
    rows[0]["chosen"] = " word" * 400
    prompt_tokens = len(tok(rows[1]["prompt"])["input_ids"])
    report = _validate(tmp_path, rows, tok, max_length=prompt_tokens + 60, max_truncated_fraction=0.1)
    assert "response_truncated" in _checks(report, "warning") and report.ok


def test_bad_ref_logps(tmp_path, tok):
    rows = _rows()
    for r in rows:
        r["ref_chosen_logps"], r["ref_rejected_logps"] = -5.0, -6.0
    rows[0]["ref_chosen_logps"] = float("nan")
    assert "ref_logps" in _checks(_validate(tmp_path, rows, tok))


def test_missing_dir_names_the_fix(tmp_path):
    with pytest.raises(PairsDataError, match="pair_builder"):
        load_pairs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairsDataError, match="no \\*.parquet"):
        load_pairs(tmp_path / "empty")


def test_passed_counts_warns_except_for_extra_pairs(tmp_path, tok):
    rows = _rows(4)
    rows[0]["rejected_passed"] = 1  # a checker pair whose chosen passes no more: suspicious
    rows[1].update(principle_id="stop", rejected_passed=1)  # extra pairs need no margin (pair_builder.extras)
    rows[2].update(principle_id="contrast:lowercase", rejected_passed=1)
    report = _validate(tmp_path, rows, tok)
    [problem] = [p for p in report.problems if p.check == "passed_counts"]
    assert problem.severity == "warning" and problem.rows == 1 and problem.examples == ["id0"]


def test_split_eval_holds_out_checker_pairs_only():
    from datasets import Dataset

    from trainer.data import split_eval

    rows = _rows(20)
    for r in rows[:10]:
        r["principle_id"] = "stop" if r["id"] < "id5" else "contrast:no_comma"
    train, held = split_eval(Dataset.from_list(rows), 0.2, seed=0)
    assert len(held) == 2 and not any(p in ("stop", "contrast:no_comma") for p in held["principle_id"])
    assert len(train) == 18 and sorted(list(train["id"]) + list(held["id"])) == sorted(r["id"] for r in rows)
    assert split_eval(Dataset.from_list(rows), 0.05, seed=0)[1] is None  # 0.05 x 10 checker pairs rounds to 0
