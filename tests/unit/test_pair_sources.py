"""Instruction sources: seed pool (train split only), self-instruct parsing, user files, dedupe, diversity."""

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.tasks import load_tasks, split_of
from pair_builder.sample import Usage
from pair_builder.sources import (
    Instruction,
    constrain_tasks,
    dedupe,
    diversity_summary,
    file_instructions,
    parse_tasks,
    request_tasks,
    seed_instructions,
    self_instruct_prompt,
)
from shared.records import Constraint


def test_seed_pool_uses_only_train_tasks_and_is_deterministic():
    a = seed_instructions(seed=3, variants=2, max_constraints=3)
    assert a == seed_instructions(seed=3, variants=2, max_constraints=3)
    train = {t["task"] for t in load_tasks() if split_of(t["id"]) == "train"}
    assert {i.task for i in a} == train
    assert len(a) == 2 * len(train)
    assert all(1 <= len(i.constraints) <= 3 and i.text.startswith(i.task) for i in a)
    assert len({i.id for i in a}) == len(a)


def test_parse_tasks_filters_junk():
    text = (" Write a limerick about a cat who loves rain.\n"
            "8. Explain why the sky looks blue at noon.\n"
            "9. short.\n"
            "10. see https://example.com for the full list of tasks.\n"
            "11. # Query: Explain gravity to a child please.\n"
            "12. lowercase start is not a task sentence.\n"
            "13. Compare trains and planes for a 500 km trip\n"
            "14. Plan a three-day trip to the mountains on a budget.\n"
            "not numbered, the list is over\n"
            "15. Describe the water cycle in simple words.")
    assert parse_tasks(text) == ["Write a limerick about a cat who loves rain.",
                                 "Explain why the sky looks blue at noon.",
                                 "Plan a three-day trip to the mountains on a budget."]


def test_request_tasks_one_request_n_completions():
    calls = []

    def create(**kw):
        calls.append(kw)
        return SimpleNamespace(choices=[SimpleNamespace(index=1, text=" Describe a busy market at dawn.\n"),
                                        SimpleNamespace(index=0, text=" Explain how bees make honey.\n4. ok")],
                               usage=SimpleNamespace(prompt_tokens=10, completion_tokens=20))

    usage = Usage()
    client = SimpleNamespace(completions=SimpleNamespace(create=create))
    tasks = request_tasks(client, "m", ["Write a poem.", "Explain rain."], n=2, seed=1, max_tokens=50, usage=usage)
    assert tasks == ["Explain how bees make honey.", "Describe a busy market at dawn."]
    assert len(calls) == 1 and calls[0]["n"] == 2 and calls[0]["prompt"].endswith("\n3.")
    assert self_instruct_prompt(["A.", "B."]).splitlines()[-3:] == ["1. A.", "2. B.", "3."]
    assert (usage.requests, usage.completion_tokens) == (1, 20)


def test_user_file_jsonl_and_parquet(tmp_path):
    rows = [{"instruction": "Tell me a joke about owls."},
            {"task": "Explain tides.", "constraints": [{"id": "punctuation:no_comma", "kwargs": {}}]},
            {"task": "List fruit.", "constraints": json.dumps([{"id": "change_case:english_lowercase"}])}]
    p = tmp_path / "u.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = file_instructions(p)
    assert [len(i.constraints) for i in got] == [0, 1, 1]
    assert got[1].text.startswith("Explain tides. ") and "comma" in got[1].text
    assert got[0].text == got[0].task == "Tell me a joke about owls."
    pq.write_table(pa.Table.from_pylist([{"instruction": "Tell me a joke about owls."}]), tmp_path / "u.parquet")
    assert file_instructions(tmp_path / "u.parquet")[0].id == got[0].id


def test_user_file_reports_every_bad_row(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"foo": 1}) + "\n" + json.dumps({"task": "T.", "constraints": [{"id": "nope:x"}]}) + "\n"
                 + json.dumps({"task": "T.", "constraints": {"id": "x"}}) + "\n")
    with pytest.raises(ValueError) as ei:
        file_instructions(p)
    msg = str(ei.value)
    assert "3 problem(s)" in msg and "row 1" in msg and "unknown instruction id 'nope:x'" in msg and "row 3" in msg
    with pytest.raises(FileNotFoundError, match="pairs.input_file"):
        file_instructions(tmp_path / "missing.jsonl")


def _ins(task, source="seed", cons=()):
    return Instruction(id=f"{source}-{task}", task=task, text=task, constraints=tuple(cons), source=source)


def test_dedupe_exact_near_heldout_and_priority():
    items = [
        _ins("Write a short poem about the autumn rain falling on the city.", "self_instruct"),
        _ins("Write a short poem about autumn rain falling on the old city.", "seed"),  # near-dup; seed wins
        _ins("Explain how a refrigerator keeps food cold.", "seed"),
        _ins("Explain how a refrigerator keeps food cold.", "seed"),  # exact
        _ins("Explain how a refrigerator keeps food cold.", "seed", [Constraint(id="punctuation:no_comma")]),
        _ins("Describe the rules of chess for a complete beginner.", "file"),
    ]
    kept, rep = dedupe(items, threshold=0.7, blocklist=["Describe the rules of chess for a complete beginner"])
    assert [i.source for i in kept] == ["seed", "seed", "seed"]
    assert (rep.exact, rep.near, rep.heldout) == (1, 1, 1)
    assert len(kept[1:]) == 2 and kept[1].constraints != kept[2].constraints  # variants of one task survive


def test_dedupe_is_fast_enough():
    import time

    items = constrain_tasks([f"Write a story number {i} about topic {i * 7919 % 1000} and colour {i % 13}."
                             for i in range(2000)], seed=0, max_constraints=2, source="self_instruct")
    t = time.perf_counter()
    dedupe(items)
    assert time.perf_counter() - t < 20


def test_diversity_summary():
    s = diversity_summary([_ins("Write a poem."), _ins("Explain rain.", cons=[Constraint(id="punctuation:no_comma")])])
    assert s["leading_words"] == {"write": 1, "explain": 1}
    assert s["constraint_ids"] == {"punctuation:no_comma": 1}
    assert s["constraints_per_instruction"] == {0: 1, 1: 1}
