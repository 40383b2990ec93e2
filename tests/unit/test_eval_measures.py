"""Degeneration and held-out-type blocks in scores, report.md and `eval compare`, from results rows."""

import json

from eval.report import compare, degeneration_of, format_compare, heldout_scores, measures_of, write_report

ESSAY = ("Tides are the regular rise and fall of the sea, caused mainly by the gravity of the Moon. The Sun "
         "also plays a part: when the Sun and the Moon line up, the tides are higher than usual.")
LOOP = "Ideas:\n" + "* ice cube in the shape of a shaker\n" * 30


def _row(i, ids, follow, response, finish="stop"):
    return {"key": f"k{i}", "instruction_id_list": ids, "follow_strict": follow, "follow_loose": follow,
            "prompt_strict": all(follow), "prompt_loose": all(follow), "finish_reason": finish, "response": response}


def _rows(degenerate: bool, heldout_ok: bool):
    rows = []
    for i in range(40):
        if degenerate and i % 2:
            resp, fin = (LOOP, "length") if i % 4 == 1 else (ESSAY.lower().replace(",", ""), "stop")
        else:
            resp, fin = ESSAY, "stop"
        ids = ["punctuation:no_comma", "startend:quotation"] if i % 5 == 0 else ["keywords:existence"]
        follow = [degenerate, heldout_ok] if i % 5 == 0 else [degenerate]
        rows.append(_row(i, ids, follow, resp, fin))
    return rows


def _write(d, rows, **scores):
    d.mkdir(parents=True)
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if scores:
        (d / "scores.json").write_text(json.dumps(scores))


def test_heldout_scores():
    h = heldout_scores(_rows(False, True), ["startend:quotation", "change_case:english_capital"])
    assert h["n_instructions"] == 8 and h["n_prompts"] == 8 and h["strict"] == h["loose"] == 1.0
    assert h["others"] == {"n_instructions": 40, "strict": 0.0, "loose": 0.0}
    none = heldout_scores(_rows(False, True), ["detectable_format:title"])
    assert none["n_instructions"] == 0 and none["loose"] is None


def test_degeneration_block_and_old_results():
    d = degeneration_of(_rows(True, True))
    assert d["truncation_rate"] == 0.25 and d["loop_rate"] == 0.25
    assert d["habits"]["lowercase"]["rate"] == 0.25 and d["words_median"] > 0
    old = [{k: v for k, v in r.items() if k != "response"} for r in _rows(True, True)]
    assert degeneration_of(old) is None


def test_compare_reports_degeneration_and_heldout(tmp_path):
    _write(tmp_path / "a", _rows(False, True))
    _write(tmp_path / "b", _rows(True, False))
    c = compare(tmp_path / "a", tmp_path / "b", n_boot=300, heldout_types=["startend:quotation"])
    assert c["metrics"]["prompt_loose"]["delta"] > 0.5 and c["metrics"]["prompt_loose"]["significant"]
    assert c["heldout"]["loose"]["delta"] == -1.0 and c["heldout"]["loose"]["n_a"] == 8
    deg = c["degeneration"]
    assert deg["loop_rate"]["delta"] == 0.25 and deg["loop_rate"]["significant"]
    assert deg["truncation_rate"]["b"] == 0.25 and deg["words_median"]["a"] > 0
    assert deg["distinct_2"]["delta"] < 0
    text = format_compare(c, "a", "b")
    assert "heldout_loose" in text and "loop_rate" in text and "lowercase_rate" in text and "n=" in text
    # an eval without response text: degeneration is said to be unmeasured, the rest still compares
    _write(tmp_path / "old", [{k: v for k, v in r.items() if k != "response"} for r in _rows(False, True)])
    c2 = compare(tmp_path / "old", tmp_path / "b", n_boot=50)
    assert c2["degeneration"] is None and "not measured" in format_compare(c2, "old", "b")


def test_measures_of_recomputes_with_given_settings(tmp_path):
    d = tmp_path / "e"
    _write(d, _rows(True, True), degeneration={"long_words": 5}, heldout={"types": ["startend:quotation"]})
    m = measures_of(d)
    assert m["heldout"]["n_instructions"] == 8 and m["degeneration"]["long_words"] == 5
    assert m["degeneration"]["habits"]["long"]["rate"] == 1.0
    m = measures_of(d, heldout_types=["keywords:existence"], long_words=1000)
    assert m["heldout"]["n_instructions"] == 32 and m["degeneration"]["habits"]["long"]["rate"] == 0.0


def test_report_shows_degeneration_heldout_and_lengths(tmp_path):
    rows = _rows(True, False)
    d = tmp_path / "run" / "round-0" / "eval"
    _write(d, rows)
    from eval.ifeval import aggregate

    scores = {**aggregate(rows), "model": "m", "suite": "own", "settings": {}, "truncated": 10,
              "degeneration": degeneration_of(rows), "heldout": heldout_scores(rows, ["startend:quotation"])}
    md = write_report(d, scores).read_text()
    assert "## Degeneration" in md and "| looping | 0.250 |" in md and "| lowercase |" in md
    assert "## Held-out instruction types" in md and "| held-out types | 0.0000 | 0.0000 | 8 (8 prompts) |" in md
    assert "startend:quotation (held out)" in md
    assert (d / "lengths.png").stat().st_size > 1000 and "![lengths.png](lengths.png)" in md


def test_clean_metrics_count_only_answers_that_finished_without_looping(tmp_path):
    from eval.report import clean_scores, degenerate

    rows = _rows(True, True)  # every 4th answer (i % 4 == 1) loops to max_tokens, and every answer "follows"
    assert sum(map(degenerate, rows)) == 10
    c = clean_scores(rows)
    assert c["prompt_loose_clean"] == 0.75 and c["instruction_loose_clean"] == 0.75
    # a row that records its verdict is taken at its word
    assert degenerate({**rows[1], "degenerate": False}) is False
    # compare and the gate see them: B loops where A did not, on prompts both "follow"
    _write(tmp_path / "a", [{**r, "response": ESSAY, "finish_reason": "stop"} for r in rows])
    _write(tmp_path / "b", rows)
    m = compare(tmp_path / "a", tmp_path / "b", n_boot=200)["metrics"]
    assert m["prompt_loose"]["delta"] == 0 and m["prompt_loose_clean"]["delta"] == -0.25
