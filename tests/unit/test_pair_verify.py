"""Verify-and-choose rules: ties, margins, no-constraint rules, bands, scaffolding filter, checker scoring."""

import pytest

from pair_builder.sample import Candidate
from pair_builder.verify import DROP_REASONS, Bands, choose, scaffolding_problem, score_candidates
from shared.records import Constraint

WIDE = Bands(min_edit_distance=0.0, max_length_ratio=100)


def cand(text, route="sample", passed=(), parent=None, pass_no=0, verdict=None, problem=None):
    return Candidate(text=text, route=route, parent=parent, pass_no=pass_no, verdict=verdict,
                     passed=list(passed), problem=problem)


def test_most_vs_fewest_and_strict_margin():
    cs = [cand("a one", passed=[1, 0]), cand("b two", passed=[0, 0]), cand("c three", passed=[1, 1])]
    d = choose(cs, has_constraints=True, bands=WIDE)
    assert (d.chosen, d.rejected, d.reason) == (2, 1, None)
    equal = [cand("a one", passed=[1, 0]), cand("b two", passed=[0, 1])]
    assert choose(equal, has_constraints=True, bands=WIDE).reason == "no_margin"


def test_ties_go_to_rewrite_then_verdict_then_later_pass():
    cs = [cand("sample one", passed=[1]), cand("sample two", passed=[0]),
          cand("rewrite one", "rewrite", [1], parent=1, pass_no=1, verdict="needs revision")]
    assert choose(cs, has_constraints=True, bands=WIDE).chosen == 2
    # two rewrites tie: the one a later critique called GOOD wins over the later pass
    cs = [cand("s", passed=[0]), cand("r1 text", "rewrite", [1], parent=0, pass_no=1),
          cand("r2 text", "rewrite", [1], parent=1, pass_no=2, verdict="good")]
    assert choose(cs, has_constraints=True, bands=WIDE).chosen == 1
    cs[2].verdict = None  # no verdict on r1 any more
    cs.append(cand("r3 text", "rewrite", [1], parent=2, pass_no=3, verdict="needs revision"))
    # r3's critique judged r2 NEEDS REVISION; r1 and r3 carry no verdict: the later pass wins
    assert choose(cs, has_constraints=True, bands=WIDE).chosen == 3


def test_rejected_prefers_the_original_of_the_chosen_rewrite():
    cs = [cand("first sample", passed=[0]), cand("second sample", passed=[0]),
          cand("rewrite of second", "rewrite", [1], parent=1, pass_no=1)]
    d = choose(cs, has_constraints=True, bands=WIDE)
    assert (d.chosen, d.rejected) == (2, 1)


def test_ruled_out_candidates_are_skipped():
    cs = [cand("good", passed=[1]), cand("bad", passed=[0], problem="truncated"), cand("meh", passed=[0])]
    assert choose(cs, has_constraints=True, bands=WIDE).rejected == 2
    assert choose(cs[:2], has_constraints=True, bands=WIDE).reason == "no_valid_candidates"


@pytest.mark.parametrize("rule,verdict,expect", [
    ("drop", "needs revision", "no_constraints"),
    ("critique", "needs revision", None),
    ("critique", "good", "no_critique_support"),
    ("critique", None, "no_critique_support"),
    ("prefer_rewrite", "good", None),
])
def test_no_constraint_rules(rule, verdict, expect):
    cs = [cand("original answer"), cand("other sample"), cand("better answer", "rewrite", parent=0, pass_no=1,
                                                              verdict=verdict)]
    d = choose(cs, has_constraints=False, rule=rule, bands=WIDE)
    assert d.reason == expect
    if expect is None:
        assert (d.chosen, d.rejected) == (2, 0)


@pytest.mark.parametrize("bands,chosen,rejected,reason", [
    (Bands(min_chars=10, min_edit_distance=0), "long enough yes", "short", "too_short"),
    (Bands(max_chars=10, min_edit_distance=0), "x" * 11, "y" * 9, "too_long"),
    (Bands(max_length_ratio=2.0, min_edit_distance=0), "x" * 30, "y" * 10, "length_ratio"),
    (Bands(min_edit_distance=0), "the same answer here.", "the same answer here.\n", "identical"),
    (Bands(min_edit_distance=0.2), "the same answer here!", "the same answer here.", "too_similar"),
    (Bands(max_edit_distance=0.5), "completely unrelated", "nothing alike at all", "too_different"),
    (Bands(), "a fine answer", "a poor reply", None),
])
def test_bands(bands, chosen, rejected, reason):
    d = choose([cand(chosen, passed=[1]), cand(rejected, passed=[0])], has_constraints=True, bands=bands)
    assert d.reason == reason
    assert reason is None or reason in DROP_REASONS


@pytest.mark.parametrize("text,route,finish,critique,problem", [
    ("", "sample", "stop", None, "empty"),
    ("cut off mid", "sample", "length", None, "truncated"),
    ("Fine answer.\n# Query:\nWhat next?", "sample", "stop", None, "query_echo"),
    ("Here is the revised response: cats purr.", "rewrite", "stop", None, "preamble"),
    ("Sure! Here's an improved version of the poem.", "rewrite", "stop", None, "preamble"),
    ("Revised answer: cats purr.", "rewrite", "stop", None, "preamble"),
    ("Cats purr.\nVerdict: GOOD", "rewrite", "stop", None, "critique_leak"),
    ("As the critique says, cats purr.", "rewrite", "stop", None, "critique_leak"),
    ("Cats purr. The answer has 2 sentences and needs three.", "rewrite", "stop",
     "The answer has 2 sentences and needs three.", "critique_leak"),
    ("Here is a recipe for bread: flour, water, salt.", "sample", "stop", None, None),
    ("## Answer key\nB, C, A.", "sample", "stop", None, None),
])
def test_scaffolding(text, route, finish, critique, problem):
    c = Candidate(text=text, route=route, finish_reason=finish, critique=critique)
    assert scaffolding_problem(c) == problem


def test_score_candidates_uses_the_eval_checkers():
    cons = [Constraint(id="punctuation:no_comma"), Constraint(id="change_case:english_lowercase")]
    cs = [Candidate(text="all lowercase, with a comma", route="sample", finish_reason="stop"),
          Candidate(text="all lowercase and no comma", route="sample", finish_reason="stop"),
          Candidate(text="Has Capitals", route="sample", finish_reason="stop")]
    score_candidates(cs, "Say something.", cons)
    assert [c.passed for c in cs] == [[False, True], [True, True], [True, False]]
    assert [c.problem for c in cs] == [None, None, None]


def test_a_candidate_that_restates_its_constraints_is_ruled_out():
    # real candidates of the first GPU round (gemma3-270m): the section placeholders and the constraint sentence
    # copied pass the section checker by accident and teach "repeat the request"
    from pair_builder.verify import echo_grams
    from shared.records import Constraint

    sections = Constraint(id="detectable_format:multiple_sections", kwargs={"section_spliter": "PART", "num_sections": 2})
    end = Constraint(id="startend:end_checker", kwargs={"end_phrase": "Let me know if you have additional questions."})
    from eval.constraints import render_prompt

    instruction = render_prompt("Explain how airplanes stay in the air.", [sections, end])
    echo = echo_grams(instruction, [sections, end])

    def problem(text):
        return scaffolding_problem(Candidate(text=text, route="sample", finish_reason="stop"), None, instruction,
                                   echo=echo)

    assert problem("PART 1\n[content of section 1]\nPART 2\n[content of section 2]") == "echoes_instruction"
    assert problem("Wings push air down. Let me know if you have additional questions.. No other words should "
                   "follow this phrase.") == "echoes_instruction"
    # what the constraints ask for (the end phrase) and the task's own words are no echo
    assert problem("PART 1\nWings push air down, so the air pushes the wings up.\nPART 2\nAirplanes stay in the "
                   "air because of lift. Let me know if you have additional questions.") is None
    assert problem("Explain how airplanes stay in the air: the wings make lift.") is None
