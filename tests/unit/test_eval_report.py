import json
import re

import pytest

from eval.report import compare, write_report


def _results(flags):
    return [{"key": f"k{i}", "instruction_id_list": ["punctuation:no_comma"], "follow_strict": [f],
             "follow_loose": [f], "prompt_strict": f, "prompt_loose": f} for i, f in enumerate(flags)]


def _write(d, flags):
    d.mkdir(parents=True)
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _results(flags)))


def test_compare_detects_gain_and_noise(tmp_path):
    _write(tmp_path / "a", [False] * 80 + [True] * 20)
    _write(tmp_path / "b", [True] * 90 + [False] * 10)
    c = compare(tmp_path / "a", tmp_path / "b", n_boot=500)
    m = c["metrics"]["prompt_strict"]
    assert c["n_paired"] == 100
    assert abs(m["delta"] - 0.7) < 1e-9 and m["significant"] and m["ci95"][0] > 0.5
    same = compare(tmp_path / "a", tmp_path / "a", n_boot=200)["metrics"]["prompt_loose"]
    assert same["delta"] == 0 and not same["significant"]


def test_report_with_round_history(tmp_path):
    scores = {"model": "m", "suite": "own", "n_prompts": 2, "settings": {}, "truncated": 0,
              "prompt_strict": 0.5, "prompt_loose": 0.5, "instruction_strict": 0.5, "instruction_loose": 0.5,
              "by_instruction": {"punctuation": {"strict": 0.5, "loose": 0.5, "count": 2},
                                 "punctuation:no_comma": {"strict": 0.5, "loose": 0.5, "count": 2}}}
    for k, v in ((0, 0.25), (1, 0.5)):
        d = tmp_path / "run" / f"round-{k}" / "eval"
        d.mkdir(parents=True)
        (d / "scores.json").write_text(json.dumps({**scores, "prompt_loose": v}))
    out = tmp_path / "run" / "round-1" / "eval"
    md = write_report(out, scores).read_text()
    assert "| prompt_strict | 0.5000 |" in md and "## By round" in md
    assert (out / "by_category.png").stat().st_size > 1000 and (out / "rounds.png").exists()


def test_hub_suite_offline_names_the_packaged_copy(monkeypatch):
    import pytest

    from eval.run import EvalError, load_suite

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(EvalError, match="--suite ifeval"):
        load_suite("hub:google/IFEval")


def test_suites_load_and_limit():
    from eval.run import load_suite

    name, items = load_suite("ifeval", limit=5)
    assert name == "ifeval" and len(items) == 5 and all(it["key"] for it in items)
    name, items = load_suite("own")
    assert name == "own" and len(items) >= 20


@pytest.mark.parametrize("content,match", [
    ('{"key": 1}\nnot json\n', r"results.jsonl: 1 bad line\(s\), e.g. line 2"),
    ('{"key": 1}\n', "line 1 lacks the eval result fields"),
    ('[1, 2]\n', "line 1 lacks the eval result fields"),
])
def test_compare_names_a_corrupt_results_file(tmp_path, capsys, content, match):
    from eval.__main__ import main

    d = tmp_path / "ev"
    d.mkdir()
    (d / "results.jsonl").write_text(content)
    assert main(["compare", str(d), str(d)]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and str(d) in err and "Traceback" not in err


def _write_tasks(d, flags, tasks):
    d.mkdir(parents=True)
    d.joinpath("results.jsonl").write_text("".join(
        json.dumps({**r, "task_id": t}) + "\n" for r, t in zip(_results(flags), tasks, strict=True)))


def test_compare_resamples_whole_tasks_when_rows_name_them(tmp_path):
    # 10 tasks x 10 variants; B gains on 3 tasks (every variant) and loses on 2: a gain carried by a few tasks
    tasks = [f"seed-{i // 10}" for i in range(100)]
    b = [i // 10 in (0, 1, 2) for i in range(100)]
    a = [i // 10 in (3, 4) for i in range(100)]
    _write_tasks(tmp_path / "a", a, tasks)
    _write_tasks(tmp_path / "b", b, tasks)
    (tmp_path / "pa").mkdir(), (tmp_path / "pb").mkdir()  # the same verdicts without task ids
    _write(tmp_path / "pa" / "x", a)
    _write(tmp_path / "pb" / "x", b)
    by_task = compare(tmp_path / "a", tmp_path / "b", n_boot=1000)
    by_prompt = compare(tmp_path / "pa" / "x", tmp_path / "pb" / "x", n_boot=1000)
    assert by_task["resampled"] == "seed task" and by_task["n_groups"] == 10
    assert by_prompt["resampled"] == "prompt" and by_prompt["n_groups"] == 100
    t, p = by_task["metrics"]["prompt_strict"], by_prompt["metrics"]["prompt_strict"]
    assert abs(t["delta"] - 0.1) < 1e-9 and abs(p["delta"] - 0.1) < 1e-9
    # correlated variants: the task-level interval is much wider, and here it does not exclude 0
    assert (t["ci95"][1] - t["ci95"][0]) > 2 * (p["ci95"][1] - p["ci95"][0])
    assert not t["significant"]


def test_an_echo_is_degenerate_and_counted_in_its_own_rate():
    from eval.run import score_responses

    item = {"key": 1, "prompt": "Write a short note to a neighbour about the noise at night. End your response "
                                "with the exact phrase Any other questions?",
            "instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "Any other questions?"}]}
    echo = "Write a short note to a neighbour about the noise at night. Any other questions?"
    note = "Hi Sam, the music last night was loud after midnight; could you keep it down? Any other questions?"
    rows, scores = score_responses([item, {**item, "key": 2}], [(echo, "stop"), (note, "stop")], None,
                                   heldout_types=[])
    assert [r["echo"] for r in rows] == [True, False] and [r["prompt_loose"] for r in rows] == [True, True]
    assert [r["degenerate"] for r in rows] == [True, False]
    assert scores["prompt_loose"] == 1.0 and scores["prompt_loose_clean"] == 0.5
    assert scores["degeneration"]["echo_rate"] == 0.5
    assert [r["fewshot"] for r in rows] == [None, None]  # no template, no few-shot examples to talk about


def test_score_responses_records_fewshot_talk_with_the_template():
    from eval.run import score_responses
    from shared.prompting import load_template

    items = [{"key": i, "prompt": p, "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]} for i, p in
             enumerate(["Explain how taxes work. Do not use commas.", "Write a haiku about autumn rain. No commas."]
                       + [f"Describe city number {i} in one paragraph. No commas." for i in range(40)])]
    talk = "The haiku is a short poem about autumn rain and the gutter sings all night long."
    asked = "Autumn rain falls soft\ngrey puddles hold the haiku\nthe city sleeps on"
    raw = [(talk, "stop"), (asked, "stop")] + [("A quiet city by a river with old bridges.", "stop")] * 40
    rows, scores = score_responses(items, raw, load_template(), heldout_types=[])
    assert [r["fewshot"] for r in rows[:3]] == [True, False, False]  # the second prompt asks for that haiku
    assert scores["degeneration"]["habits"]["fewshot"]["rate"] == 1 / 42


def test_config_settings_is_the_one_config_to_run_eval_mapping():
    import inspect

    from eval.run import config_settings, run_eval
    from shared.config import load_config

    cfg = load_config(None, ["eval.suite=ifeval", "eval.limit=7", "eval.max_tokens=99", "eval.concurrency=3",
                             "eval.prompts_per_request=2", "eval.long_answer_words=150", "client.timeout_s=12",
                             "client.max_retries=1", "client.stall_timeout_s=34", "eval.heldout_types=[startend:quotation]"])
    kw = config_settings(cfg)
    assert set(kw) <= set(inspect.signature(run_eval).parameters)
    assert (kw["suite"], kw["limit"], kw["settings"].max_tokens, kw["concurrency"], kw["prompts_per_request"],
            kw["long_words"], kw["timeout"], kw["max_retries"], kw["stall_timeout"], list(kw["heldout_types"])) == (
        "ifeval", 7, 99, 3, 2, 150, 12, 1, 34, ["startend:quotation"])
