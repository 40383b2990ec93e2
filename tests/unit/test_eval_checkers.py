"""The instruction-type registry (eval.checkers): the project's own checker, drawn, described, verified, scored."""

import random

import pytest

from eval import checkers
from eval.constraints import GENERATED_IDS, conflicts, describe, make_item, sample_constraints
from eval.ifeval import INSTRUCTION_IDS, KNOWN_IDS, check, instruction_class, load_jsonl_suite, score_response
from shared.records import Constraint

ID = "project:no_repeated_sentence"
# answers of gemma3-270m from the first GPU round (pair candidates and IFEval answers)
LOOP = "The answer is not complete.\nThe answer is not clear.\n" * 6
SLEEP = "I sleep well, I sleep well, I sleep well."
FINE = ("A town festival is a festival where 400 or more people are present.\nThe mayor is also the chief "
        "executive.")


def test_the_project_checker_is_registered_beside_ifevals():
    assert ID in KNOWN_IDS and ID not in INSTRUCTION_IDS and len(INSTRUCTION_IDS) == 25
    assert ID in GENERATED_IDS and instruction_class(ID) is checkers.NoRepeatedSentence
    assert "combination:two_responses" in conflicts()[ID] and ID in conflicts()["combination:two_responses"]


@pytest.mark.parametrize(("response", "follows"), [(FINE, True), (LOOP, False), (SLEEP, False), ("  ", False)])
def test_its_verdicts_strict_and_loose(response, follows):
    prompt = "Write a news report about a town festival. " + describe(Constraint(id=ID, kwargs={}))
    assert check(ID, {}, prompt, response) is follows
    assert check(ID, {}, prompt, response, loose=True) is follows


def test_a_generated_item_asks_for_it_and_scores_through_ifeval(tmp_path):
    rng = random.Random(0)
    draws = [sample_constraints(rng, 3) for _ in range(200)]
    with_it = [d for d in draws if any(c.id == ID for c in d)]
    assert with_it and all(not ({c.id for c in d} & {"combination:two_responses"}) for d in with_it)
    item = next(it for v in range(200) if ID in (it := make_item({"id": "t", "task": "Explain tides."}, seed=1,
                                                                  variant=v))["instruction_id_list"])
    assert "say each sentence only once" in item["prompt"]
    i = item["instruction_id_list"].index(ID)
    assert score_response(item, FINE)["follow_strict"][i] and not score_response(item, LOOP)["follow_strict"][i]
    # a user's suite file may ask for it too
    p = tmp_path / "suite.jsonl"
    p.write_text('{"key": 1, "prompt": "Explain tides. Say each sentence only once.", '
                 f'"instruction_id_list": ["{ID}"], "kwargs": [{{}}]}}\n')
    assert load_jsonl_suite(p)[0]["instruction_id_list"] == [ID]


def test_register_refuses_a_foreign_or_taken_id():
    with pytest.raises(ValueError, match="start with 'project:'"):
        checkers.register("mine:x", checkers.NoRepeatedSentence)
    with pytest.raises(ValueError, match="already registered"):
        checkers.register(ID, checkers.NoRepeatedSentence)
