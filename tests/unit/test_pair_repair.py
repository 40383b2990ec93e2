"""Format repairs (pair_builder.repair): each rule's output judged by the real IFEval checkers, the dominance
rule, the held-out types left alone, and the repair pairs a recorded GPU round yields."""

import json
from pathlib import Path

import pytest

from pair_builder.build import BuildSettings, build_item
from pair_builder.extras import REPAIR, item_extras, repair_pair, select_extras
from pair_builder.repair import REPAIRS, best_repair, groups, sentences, variants
from pair_builder.sample import Candidate
from pair_builder.sources import Instruction
from pair_builder.verify import check_text
from shared.records import Constraint
from tests.unit.test_pair_build import PRINCIPLE, SETTINGS, TEMPLATE, FakeClient

ANSWER = ("Tides rise and fall twice a day. The moon pulls the water toward it. The sun adds a smaller pull. "
          "Together they make spring tides and neap tides.")
OTHER = "The ocean moves because the moon and the sun pull on it, and the Earth turns beneath the water."
RUN3 = Path(__file__).resolve().parents[2] / "docs/runs/base-gpu/run-3/pairs"


def _cons(*pairs):
    return [Constraint(id=i, kwargs=k) for i, k in pairs]


def _check(cons, instruction="Explain the tides."):
    return lambda t: check_text(t, instruction, cons)


@pytest.mark.parametrize("cid,kwargs", [
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2}),
    ("detectable_format:number_bullet_lists", {"num_bullets": 4}),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}),
    ("combination:two_responses", {}),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}),
    ("detectable_format:json_format", {}),
])
def test_each_repair_passes_the_real_checker_that_the_answer_failed(cid, kwargs):
    cons = _cons((cid, kwargs))
    check = _check(cons)
    assert check(ANSWER) == [False]
    got = best_repair(ANSWER, [False], cons, check, others=[OTHER])
    assert got is not None and got[1] == [True], got
    text = got[0]
    if cid != "detectable_format:json_format":  # the model's words stay, in order
        assert all(s.strip("*") in text for s in sentences(ANSWER))
    else:
        assert json.loads(text) == {"answer": ANSWER}


def test_every_repair_is_covered_by_the_test_above():
    assert set(REPAIRS) == {"length_constraints:number_paragraphs", "detectable_format:multiple_sections",
                            "detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections",
                            "detectable_content:postscript", "combination:two_responses", "startend:end_checker",
                            "detectable_format:json_format"}


def test_several_formats_at_once_and_the_best_variant_wins():
    cons = _cons(("detectable_format:number_bullet_lists", {"num_bullets": 2}),
                 ("detectable_content:postscript", {"postscript_marker": "P.S."}),
                 ("startend:end_checker", {"end_phrase": "That is all."}))
    got = best_repair(ANSWER, [False, False, False], cons, _check(cons))
    assert got is not None and got[1] == [True, True, True]
    assert got[0].startswith("* ") and got[0].endswith("That is all.") and "\n\nP.S. " in got[0]
    # JSON and an end phrase cannot both hold: the best single repair passes one more than the answer
    cons = _cons(("detectable_format:json_format", {}), ("startend:end_checker", {"end_phrase": "That is all."}))
    got = best_repair(ANSWER, [False, False], cons, _check(cons))
    assert got is not None and sum(got[1]) == 1


def test_a_repair_that_breaks_a_passed_constraint_is_not_kept():
    # a second response doubles the length: "less than 30 words" passed before and would fail after
    cons = _cons(("combination:two_responses", {}),
                 ("length_constraints:number_words", {"num_words": 30, "relation": "less than"}))
    check = _check(cons)
    assert check(ANSWER) == [False, True]
    assert best_repair(ANSWER, [False, True], cons, check, others=[OTHER]) is None


def test_what_is_not_repaired():
    cons = _cons(("detectable_format:number_bullet_lists", {"num_bullets": 9}))
    assert variants(ANSWER, cons) == []  # fewer sentences than bullets
    assert variants("One *starred* sentence. And one more here.", _cons(("startend:end_checker",
                                                                           {"end_phrase": "Bye."}))) == []
    assert variants(ANSWER, _cons(("combination:two_responses", {}))) == []  # no second answer to give
    assert variants(ANSWER, _cons(("detectable_format:title", {}), ("keywords:existence", {"keywords": ["x"]}))) == []
    end = _cons(("startend:end_checker", {"end_phrase": "Bye."}))
    assert variants(ANSWER, end, exclude={"startend:end_checker"}) == []  # a held-out type
    assert variants(ANSWER, [{"id": "startend:end_checker", "kwargs": {}}]) == []  # kwargs it cannot read


def test_groups_and_sentences():
    assert groups(list("abcde"), 2) == [["a", "b", "c"], ["d", "e"]]
    assert groups(list("ab"), 3) is None
    assert sentences("One. Two!  Three?\nFour") == ["One.", "Two!", "Three?", "Four"]
    # a list the model wrote is laid out again from its items, without its marks
    assert sentences("Water cycles.\n- The sun heats it.\n- Rain falls.\n2) It flows back.") == [
        "Water cycles.", "The sun heats it.", "Rain falls.", "It flows back."]


def _cand(text, passed, problem=None):
    return Candidate(text=text, route="sample", finish_reason="stop", passed=passed, problem=problem)


def test_repair_pair_repairs_the_best_usable_answer_and_item_extras_makes_the_pair():
    cons = _cons(("detectable_content:postscript", {"postscript_marker": "P.S."}),
                 ("keywords:existence", {"keywords": ["moon"]}))
    check = _check(cons)
    cands = [_cand("Short.", [False, False]), _cand(ANSWER, check(ANSWER)),
             _cand(ANSWER + " " + ANSWER, [False, True], problem="looping")]
    g, text, passed = repair_pair(cands, cons, check=check)
    assert g == 1 and passed == [True, True] and text.endswith("P.S. Together they make spring tides and neap tides.")
    [x] = item_extras(cands, kept=None, constraint_ids=[c.id for c in cons], check=check, stop=False,
                      contrast=False, repair=True, constraints=cons)
    assert x == {"kind": REPAIR, "chosen": text, "rejected": ANSWER, "chosen_passed": 2, "rejected_passed": 1}
    assert item_extras(cands, kept=None, constraint_ids=[c.id for c in cons], check=check, stop=False,
                       contrast=False, repair=True, constraints=cons,
                       no_repair=["detectable_content:postscript"]) == []


def test_build_item_writes_a_repair_pair_even_when_no_checker_pair_is_kept():
    task = Instruction(id="t1", text="Describe the tides. At the end of your response, please explicitly add a "
                       "postscript starting with P.S.", source="seed", task="Describe the tides.",
                       constraints=(Constraint(id="detectable_content:postscript",
                                               kwargs={"postscript_marker": "P.S."}),))
    on = BuildSettings(**{**SETTINGS.__dict__, "repair": True, "relevance": SETTINGS.relevance})
    fc = FakeClient([ANSWER, ANSWER], revision=ANSWER)
    res = build_item(fc, task, PRINCIPLE, settings=on, template=TEMPLATE)
    assert not res["kept"]  # every sample fails the postscript alike: no checker pair
    [rep] = [x for x in res["extras"] if x["kind"] == REPAIR]
    assert rep["record"]["rejected"] == ANSWER and "\n\nP.S. " in rep["record"]["chosen"]
    assert rep["record"]["chosen_passed"] == 1 and rep["record"]["rejected_passed"] == 0
    assert rep["record"]["ref_chosen_logps"] is not None
    off = build_item(FakeClient([ANSWER, ANSWER], revision=ANSWER), task, PRINCIPLE, settings=SETTINGS,
                     template=TEMPLATE)
    assert off is None or not off.get("extras")


def test_select_extras_takes_repair_pairs_per_checker_pair():
    records = {f"c{i}": {"id": f"c{i}", "chosen": ANSWER, "rejected": OTHER} for i in range(4)}
    entries = [{"id": f"r{i}", "extras": [{"kind": REPAIR, "record": {"id": "x", "prompt": "p", "chosen": ANSWER + "!",
                                                                      "rejected": ANSWER, "principle_id": REPAIR}}]}
               for i in range(10)]
    got = select_extras(entries, records, habit_contrast=0.0, stop_pairs=0.0, repair_pairs=0.5)
    assert [r["principle_id"] for r in got] == [REPAIR, REPAIR] and len({r["id"] for r in got}) == 2
    assert select_extras(entries, records, habit_contrast=0.0, stop_pairs=0.0) == []


@pytest.mark.skipif(not (RUN3 / ".meta/candidates.jsonl.gz").exists(), reason="the recorded round is not here")
def test_the_recorded_gpu_round_yields_repair_pairs_that_the_checkers_confirm():
    from pair_builder.audit import replay_extras
    from shared.config import EvalConfig
    from shared.prompting import load_template

    held = list(EvalConfig().heldout_types)
    res = replay_extras(RUN3, habit_contrast=0.25, stop_pairs=0.5, incidental_weight=0.25, repair_pairs=0.5,
                        records=True, no_repair=held)
    assert res["candidates"][REPAIR] > 500
    reps = [r for r in res["records"] if r["principle_id"] == REPAIR]
    assert len(reps) == round(0.5 * res["pairs"])
    tpl = load_template()
    for r in reps[:40]:
        cons = [Constraint(**c) for c in json.loads(r["constraints"])]
        assert not {c.id for c in cons} & set(held)
        ins = tpl.instruction_of(r["prompt"]) if r["prompt"] else ""
        before, after = check_text(r["rejected"], ins, cons), check_text(r["chosen"], ins, cons)
        assert sum(after) > sum(before) and all(a or not b for a, b in zip(after, before))


def test_same_ending_tells_the_repairs_that_move_where_the_answer_stops():
    from pair_builder.repair import same_ending

    text = "The moon pulls the water. The sun adds a smaller pull."
    inside = "The moon pulls the water.\n\n***\n\nThe sun adds a smaller pull."
    assert same_ending(inside, text)
    assert same_ending("The moon pulls the water.\n\nP.S. The sun adds a smaller pull.", text)
    assert not same_ending(text + "\n\nAny other questions?", text)           # an end phrase
    assert not same_ending('{"answer": "' + text + '"}', text)                # a JSON wrapper
    assert not same_ending("The moon pulls the water. *The sun adds a smaller pull.*", text)  # a highlight
    assert not same_ending("Too short", "Too short")                          # fewer than 3 words
