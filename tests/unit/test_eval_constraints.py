import random

from eval.constraints import GENERATED_IDS, conflicts, make_item, own_suite, sample_constraints
from eval.ifeval import KNOWN_IDS, check, load_jsonl_suite
from shared.tasks import load_tasks, split_of


def test_generated_ids_are_registry_ids():
    assert set(GENERATED_IDS) <= set(KNOWN_IDS)
    assert len(GENERATED_IDS) >= 18


def test_sampled_constraints_never_conflict():
    table = conflicts()
    rng = random.Random(0)
    for _ in range(500):
        cons = sample_constraints(rng, 3)
        ids = [c.id for c in cons]
        assert len(set(ids)) == len(ids) == 3
        for a in ids:
            for b in ids:
                if a != b:
                    assert b not in table.get(a, ()), (a, b)


def test_conflict_table_is_symmetric():
    t = conflicts()
    assert "detectable_format:json_format" in t["punctuation:no_comma"]  # only listed one way in lm-eval
    for a, bs in t.items():
        assert a in bs
        for b in bs:
            assert a in t[b]


def test_items_are_deterministic_and_checkable():
    tasks = load_tasks()
    assert len(tasks) >= 100
    a = make_item(tasks[0], seed=7, variant=1)
    assert a == make_item(tasks[0], seed=7, variant=1)
    assert a != make_item(tasks[0], seed=8, variant=1)
    # every generated constraint is one lm-eval's checker accepts, with the text in the prompt
    rng = random.Random(1)
    for iid in GENERATED_IDS:
        for t in tasks[:3]:
            item = make_item(t, seed=rng.randint(0, 10**6))
            for cid, kw in zip(item["instruction_id_list"], item["kwargs"]):
                assert isinstance(check(cid, kw, item["prompt"], "A plain answer."), bool)
    assert a["prompt"].startswith(tasks[0]["task"])


def test_heldout_split_is_disjoint_and_stable(tmp_path):
    tasks = load_tasks()
    held = {t["id"] for t in tasks if split_of(t["id"]) == "heldout"}
    assert 0.1 * len(tasks) < len(held) < 0.35 * len(tasks)
    suite = own_suite(variants=2)
    assert {it["task_id"] for it in suite} == held and len(suite) == 2 * len(held)
    assert not {it["task_id"] for it in own_suite(split="train", variants=1)} & held
    # the suite round-trips through the JSONL loader (valid IFEval items)
    import json

    p = tmp_path / "s.jsonl"
    p.write_text("".join(json.dumps(it) + "\n" for it in suite))
    assert len(load_jsonl_suite(p)) == len(suite)


def test_bad_task_file_lists_every_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"id": "a", "task": "x"}\nnot json\n{"id": "a", "task": "y"}\n{"task": ""}\n')
    import pytest

    with pytest.raises(ValueError) as ei:
        load_tasks(p)
    msg = str(ei.value)
    assert "line 2" in msg and "line 3" in msg and "line 4" in msg
