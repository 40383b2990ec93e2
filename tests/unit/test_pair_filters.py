"""The pair filters on REAL model outputs: turn cuts, copied examples, loops, relevance, dominance, the audit.

tests/assets/recorded_candidates.json holds raw completions of the packaged models (SmolLM2-135M through the
embedded server, Gemma 3 270M) to pair_builder prompts, each with what the filters must say about it, checked
by hand; tests/assets/labelled_pairs.jsonl holds pairs from real runs with the filters off, labelled by hand.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from eval.degeneration import is_looping
from pair_builder.audit import (
    DEFECTS,
    audit_dir,
    evaluate_labelled,
    load_labelled,
    pair_defects,
    rate_table,
    task_of,
)
from pair_builder.build import BuildSettings, build_item, example_index
from pair_builder.constitution import load_constitution
from pair_builder.relevance import pmi_scores, task_overlap
from pair_builder.sample import Candidate, SamplingSettings, Usage, finished
from pair_builder.sources import Instruction
from pair_builder.verify import DROP_REASONS, Bands, ExampleIndex, Relevance, choose, dominates, scaffolding_problem
from shared.prompting import cut_at_new_turn, load_template
from shared.records import Constraint

ASSETS = Path(__file__).resolve().parents[1] / "assets"
RECORDED = json.loads((ASSETS / "recorded_candidates.json").read_text())["candidates"]
LABELLED = load_labelled(ASSETS / "labelled_pairs.jsonl")
TEMPLATE = load_template()
CONSTITUTION = load_constitution()
EXAMPLES = ExampleIndex.from_sources(TEMPLATE, CONSTITUTION)
WIDE = Bands(min_edit_distance=0.0, max_length_ratio=100, max_edit_distance=1.0)


def _ids(c):
    return f"{c['model']}:{c['raw'][:30]!r}"


@pytest.mark.parametrize("rec", [c for c in RECORDED if "cut" in c["expect"]], ids=_ids)
def test_recorded_run_ons_are_cut_and_count_as_finished(rec):
    text, finish, cut = finished(rec["raw"], rec["finish_reason"], rec["instruction"], TEMPLATE.stop)
    assert cut == rec["expect"]["cut"]
    if "text" in rec["expect"]:
        assert text == rec["expect"]["text"]
    if cut:
        assert finish == "stop" and "# Question" not in text and "# Response" not in text
        assert scaffolding_problem(Candidate(text=text, route="sample", finish_reason=finish)) != "truncated"
    else:
        assert text == rec["raw"].strip() and finish == rec["finish_reason"]


@pytest.mark.parametrize("rec", [c for c in RECORDED if "copies" in c["expect"]], ids=_ids)
def test_recorded_copies_of_few_shot_examples_are_ruled_out(rec):
    text, finish, _ = finished(rec["raw"], rec["finish_reason"], rec["instruction"], TEMPLATE.stop)
    c = Candidate(text=text, route=rec["route"], finish_reason=finish)
    problem = scaffolding_problem(c, EXAMPLES, rec["instruction"])
    assert (problem == "copies_example") == rec["expect"]["copies"], (problem, EXAMPLES.longest_span(text))


@pytest.mark.parametrize("rec", [c for c in RECORDED if "looping" in c["expect"]], ids=_ids)
def test_recorded_loops_are_ruled_out(rec):
    text, finish, _ = finished(rec["raw"], rec["finish_reason"], rec["instruction"], TEMPLATE.stop)
    c = Candidate(text=text, route=rec["route"], finish_reason="stop")  # the loop, not the token limit, is tested
    assert is_looping(text) == rec["expect"]["looping"]
    assert (scaffolding_problem(c, EXAMPLES, rec["instruction"]) == "looping") == rec["expect"]["looping"]
    assert scaffolding_problem(c, EXAMPLES, rec["instruction"], looping=False) != "looping"


@pytest.mark.parametrize("rec", [c for c in RECORDED if "irrelevant" in c["expect"]], ids=_ids)
def test_recorded_answers_to_another_question_fail_task_overlap(rec):
    text, _, _ = finished(rec["raw"], rec["finish_reason"], rec["instruction"], TEMPLATE.stop)
    c = Candidate(text=text, route=rec["route"], overlap=task_overlap(rec["task"], text))
    assert (not Relevance(min_overlap=0.2).ok(c)) == rec["expect"]["irrelevant"], c.overlap


@pytest.mark.parametrize("text,instruction,expected", [
    ("Fine.\n\n# Question: How many words does it take to explain everything?", "", "Fine."),
    ("Fine.\n## Request:\nmore", "", "Fine."),
    ("Fine.\n### Instruction:\nWrite a poem", "", "Fine."),
    ("Fine.\n### Instruction\nWrite a poem", "", "Fine."),
    ("Fine.\n# Instructions\n\nBelow is", "", "Fine."),
    ("Fine.\n##  # Question:\nx", "", "Fine."),
    ("Fine.\nHuman: and now?", "", "Fine."),
    ("Fine.\n**User:** and now?", "", "Fine."),
    ("Fine.\nQ: what next?\nA: this", "", "Fine."),
    ("Fine.\nQuestion: what next?", "", "Fine."),
    ("Fine.\n# Response\nMore text", "", "Fine."),
    ("Fine.\n# Answer:\nMore", "", "Fine."),
    ("Fine.\n\n# Rewrite:\nFine.", "", "Fine."),  # the critique page's blocks, recorded from both models
    ("Fine.\n\n# Rewrite the answer so that it is all lowercase letters.", "", "Fine."),
    # legitimate content: not cut
    ("SECTION 1\nIntro\nSECTION 2\nMore", "Your response must have 2 sections. Mark ... SECTION X", None),
    ("We held a Q&A.\nThe Q&A: it went well.", "", None),
    ("Ingredients:\n- flour\nInstructions:\n1. Mix.", "Give a recipe for bread.", None),
    ("To do\nTask: buy milk", "Write a to-do list.", None),
    ("Quiz\nQuestion 1: What is 2+2?\nQuestion 2: What is 3+3?", "Write a quiz with two questions.", None),
    ("Scene\nUser: hi\nAssistant: hello", "Write a short dialogue between a user and an assistant.", None),
    ("## Answer key\nB, C, A.", "", None),  # first line: nothing was answered before it
    ("Points:\nthe user: always first", "", None),  # not at a line start
])
def test_cut_at_new_turn(text, instruction, expected):
    out, cut = cut_at_new_turn(text, instruction, TEMPLATE.stop)
    assert cut == (expected is not None)
    assert out == (expected if expected is not None else text.strip())


def test_template_question_header_is_cut_even_when_the_instruction_is_about_questions():
    out, cut = cut_at_new_turn("A good question is short.\n\n# Question:\nWhat is 2+2?", "Write a good question.")
    assert (out, cut) == ("A good question is short.", True)


def test_example_index_counts_spans_and_whole_short_examples_but_not_the_instruction():
    assert EXAMPLES.copies("We keep your wheels turning.")  # a whole 5-word example
    assert EXAMPLES.longest_span("We keep your wheels turning.") == 5
    assert not EXAMPLES.copies("We keep your wheels turning.", "Translate: we keep your wheels turning.")
    eight = "you control the ingredients so meals are usually healthier"
    assert EXAMPLES.copies(f"At home {eight} and cheaper.")
    assert not EXAMPLES.copies(f"At home {eight} and cheaper.", f"Explain why {eight}.")
    assert not EXAMPLES.copies("Cooking at home is cheaper and you control what goes in.")
    assert example_index(BuildSettings(model="m", model_revision="r", round=0, sampling=SamplingSettings(),
                                       bands=Bands(), no_constraint_rule="drop", ref_logprobs=False, copy_span=0),
                         TEMPLATE, CONSTITUTION) is None


def cand(text, passed, route="sample", parent=None, overlap=None):
    return Candidate(text=text, route=route, parent=parent, passed=list(passed), finish_reason="stop", overlap=overlap)


def test_dominance():
    assert dominates([True, True, False], [True, False, False])
    assert not dominates([True, True, False], [False, False, True])  # more passed, but not rejected's one
    assert not dominates([True], [True])
    cs = [cand("a first answer", [1, 1, 0]), cand("b second reply", [0, 0, 1])]
    assert choose(cs, has_constraints=True, bands=WIDE).reason == "not_dominant"
    assert choose(cs, has_constraints=True, bands=WIDE, pair_rule="count").reason is None
    # the next candidate that dominates something is chosen instead of dropping the item
    cs.append(cand("c third text", [1, 0, 1]))
    cs.append(cand("d fourth one", [0, 0, 0]))
    d = choose(cs, has_constraints=True, bands=WIDE)
    assert d.reason is None and cs[d.chosen].n_passed == 2 and cs[d.rejected].n_passed == 0
    assert "not_dominant" in DROP_REASONS and "irrelevant" in DROP_REASONS


def test_relevance_gates_only_the_chosen():
    rel = Relevance(min_overlap=0.2)
    cs = [cand("off topic but passes all", [1, 1], overlap=0.0), cand("on topic, passes one", [1, 0], overlap=0.5),
          cand("on topic, passes none", [0, 0], overlap=0.5), cand("off topic passes none", [0, 0], overlap=0.0)]
    d = choose(cs, has_constraints=True, bands=WIDE, relevance=rel)
    assert (d.chosen, d.reason) == (1, None) and cs[d.rejected].n_passed == 0
    assert choose(cs[:1] + cs[3:], has_constraints=True, bands=WIDE, relevance=rel).reason == "irrelevant"
    assert choose(cs, has_constraints=True, bands=WIDE).chosen == 0  # no threshold: as before


def test_task_overlap_and_task_of():
    assert task_overlap("Explain the difference between weather and climate.",
                        "* Cooking at home costs much less than eating out.") == 0.0
    assert task_overlap("Compare cats and dogs as pets.", "A cat suits a small flat; dogs need walks.") == 0.5
    assert task_overlap("Tell me about it.", "anything") is None  # no content word to measure
    ins = ("Describe a sunrise over the ocean. Wrap your entire response with double quotation marks. Your entire "
           "response should be in English, and in all lowercase letters. No capital letters are allowed.")
    cons = [{"id": "startend:quotation", "kwargs": {}}, {"id": "change_case:english_lowercase", "kwargs": {}}]
    assert task_of(ins, cons) == "Describe a sunrise over the ocean."


class EchoClient:
    """Echo log-probs like gen_server: one token per character, -1 each, -0.25 when the char is in the answer."""

    def __init__(self):
        self.calls = []
        self.completions = SimpleNamespace(create=self.create)

    def create(self, **kw):
        self.calls.append(kw)
        choices = []
        for i, text in enumerate(kw["prompt"]):
            head = text.rsplit("\n\n# Query this answers:\n", 1)
            answer = head[0].removeprefix("# Answer:\n") if len(head) == 2 else ""
            lps = [None] + [(-0.25 if ch.lower() in answer.lower() else -1.0) for ch in text[1:]]
            choices.append(SimpleNamespace(index=i, logprobs=SimpleNamespace(
                tokens=list(text), token_logprobs=lps, text_offset=list(range(len(text))))))
        return SimpleNamespace(choices=choices, usage=SimpleNamespace(prompt_tokens=5, completion_tokens=0))


def test_pmi_scores_one_request_per_item():
    client, usage = EchoClient(), Usage()
    s = pmi_scores(client, "m", "cats", ["cats are great", "xyz"], usage=usage)
    [call] = client.calls
    assert call["max_tokens"] == 0 and call["echo"] is True and len(call["prompt"]) == 3 and usage.requests == 1
    assert s[0] == pytest.approx(0.75) and s[1] == pytest.approx(0.0)


class RunOnClient:
    """Serves the recorded completions: the samples run on into '# Question:', the rewrite copies an example."""

    def __init__(self, samples, revision):
        self.samples, self.revision = samples, revision
        self.completions = SimpleNamespace(create=self.create)

    def create(self, **kw):
        p = kw["prompt"]
        texts = (["Verdict: NEEDS REVISION"] if p.endswith("# Critique:\n") else [self.revision]
                 if p.endswith("# Revision:\n") else self.samples[: kw.get("n", 1)])
        finish = "stop" if p.endswith(("# Critique:\n", "# Revision:\n")) else "length"  # samples ran to the limit
        return SimpleNamespace(choices=[SimpleNamespace(index=i, text=t, finish_reason=finish)
                                        for i, t in enumerate(texts)],
                               usage=SimpleNamespace(prompt_tokens=1, completion_tokens=1))


def test_build_item_cuts_recorded_run_ons_and_rules_out_a_recorded_copy():
    run_on = [c for c in RECORDED if c["expect"].get("cut") and c["model"] == "smollm2-135m"][:2]
    copy = next(c for c in RECORDED if c["expect"].get("copies") and c["route"] == "rewrite")
    ins = Instruction(id="x", task="Describe the water cycle.", text="Describe the water cycle.")
    settings = BuildSettings(model="m", model_revision="r", round=0, sampling=SamplingSettings(k=2, revisions=1),
                             bands=WIDE, no_constraint_rule="prefer_rewrite", ref_logprobs=False,
                             record_candidates=True)
    res = build_item(RunOnClient([c["raw"] for c in run_on], copy["raw"]), ins, CONSTITUTION.get("answer-directly"),
                     settings=settings, template=TEMPLATE, examples=example_index(settings, TEMPLATE, CONSTITUTION))
    cands = res["candidates"]["candidates"]
    assert [c["cut"] for c in cands[:2]] == [True, True] and all(c["finish_reason"] == "stop" for c in cands[:2])
    assert cands[2]["problem"] == "copies_example" and res["reason"] == "no_critique_support"
    assert res["cut_turns"] == 2


def test_labelled_set_and_each_filter_measured_on_it():
    assert len(LABELLED) >= 100
    for r in LABELLED:
        assert {"instruction", "chosen", "rejected", "constraints", "labels"} <= set(r)
        assert {"runs_on", "copies_example", "looping", "irrelevant", "chosen_not_better", "too_different",
                "truncated", "worth_learning"} <= set(r["labels"])
    ev = evaluate_labelled(LABELLED)
    f = ev["filters"]
    # floors a filter change must not fall below (measured values are in the audit's --labelled table)
    assert f["runs_on"]["precision"] >= 0.9 and f["runs_on"]["recall"] >= 0.8
    assert f["copies_example"]["precision"] >= 0.9 and f["copies_example"]["recall"] >= 0.7
    assert f["irrelevant"]["precision"] >= 0.75 and f["irrelevant"]["recall"] >= 0.55
    assert f["looping"]["precision"] >= 0.6
    assert ev["all_filters_vs_not_worth"]["precision"] >= 0.85


def test_audit_of_a_pairs_dir_and_the_card(tmp_path):
    from pair_builder.report import write_card
    from pair_builder.writer import PairWriter

    manifest = {"model": "m", "model_revision": "r", "constitution_sha256": "c", "template_sha256": "t",
                "sampling": {"max_tokens": 160}, "round": 0}
    w = PairWriter(tmp_path, manifest, shard_size=100, ref_logprobs=False)
    for i, r in enumerate(LABELLED[:40]):
        rec = {"id": f"p{i}", "prompt": TEMPLATE.render(r["instruction"]), "chosen": r["chosen"],
               "rejected": r["rejected"], "instruction_id": "x", "constraints": json.dumps(r["constraints"]),
               "principle_id": "p", "chosen_passed": sum(r["chosen_passed"]),
               "rejected_passed": sum(r["rejected_passed"]), "model": "m", "round": 0}
        w.add({"id": f"p{i}", "kept": True, "record": rec, "chosen_finish": r["chosen_finish"], "task": r["task"]})
    w.flush()
    res = audit_dir(tmp_path, sample=30, template=TEMPLATE, constitution=CONSTITUTION)
    assert res["pairs"] == 40 and res["sampled"] == 30
    assert set(res["rates"]) == {*[d for d in DEFECTS if d != "irrelevant_pmi"], "any"}
    assert res["rates"]["runs_on"]["flagged"] >= 1 and res["rates"]["not_dominant"]["measured"] == 30
    table = rate_table(res["rates"])
    assert "| runs_on |" in table
    info = {"run": "r", "round": 0, "model": "m", "model_revision": "r", "constitution": "c", "constitution_sha256": "c" * 16,
            "principles": 7, "template_id": "t", "template_sha256": "t" * 16,
            "sampling": {"k": 2, "temperature": 1, "top_p": 1, "max_tokens": 160, "revisions": 1,
                         "critique_temperature": 0.3, "seed": 0},
            "no_constraint_rule": "drop", "servers": "s", "instructions": 1, "sources": "seed", "ref_logprobs": False,
            "cost_usd": 0.0, "usd_per_hour": 0.0, "cost_per_pair": 0.0, "filters": {"pair_rule": "dominance"}}
    stats = {"items_done": 40, "kept": 40, "acceptance_rate": 1.0, "drop_reasons": {}, "chosen_route": {},
             "candidate_problems": {}, "pass_rate": {}, "usage": {}, "cut_at_new_turn": 3}
    card = write_card(tmp_path, info, stats, [], {**res, "table": table}).read_text()
    assert "## Audit of the kept pairs" in card and "| runs_on |" in card and "pair_rule=dominance" in card


def test_pair_defects_on_a_labelled_run_on():
    r = next(r for r in LABELLED if r["labels"]["runs_on"] and "# Question:" in r["chosen"])
    flags = pair_defects(r, examples=EXAMPLES, template=TEMPLATE)
    assert flags["runs_on"] is True and flags["truncated"] is False


# Two chosen/rejected pairs gemma3-270m's round-0 pair build kept on an H200 (configs/base-gpu.yaml, before this
# rule): each chosen answer is all-lowercase though its instruction never asked for it. 9 of that run's 293 pairs
# were like these, and one DPO round took unrequested all-lowercase answers on IFEval from 1.8% to 16.4%.
HABIT_PAIRS = [
    (["detectable_format:multiple_sections", "punctuation:no_comma"],
     "the fur of a cat's base gives protection from predators by absorbing\na. electric charges\nb. poison\nc. heat\n"
     "d. cold\ne. heat and poison",
     "There are three different ways to protect a cat from a storm, to the right of the house, to the left of the "
     "house, and to the left of the barn."),
    (["change_case:capital_word_frequency", "length_constraints:number_words", "keywords:letter_frequency"],
     "the first women to ever live in the bay area\nshe was born in san francisco and lived there all her life\nshe "
     "was the mother of the first woman to ever live in the bay area",
     "The first day of the year in 1904 was called by the women's rights movement because the year was beginning "
     "to see a shift in economic power away from\nthe wealthy to the poor."),
]


@pytest.mark.parametrize("ids,chosen,rejected", HABIT_PAIRS)
def test_chosen_with_an_unrequested_case_habit_is_dropped(ids, chosen, rejected):
    from pair_builder.verify import unrequested_habit

    assert unrequested_habit(chosen, rejected, ids) == "lowercase"
    # asked for: a lowercase chosen is the lesson itself
    assert unrequested_habit(chosen, rejected, [*ids, "change_case:english_lowercase"]) is None
    # both lowercase: the pair's contrast is not about case
    assert unrequested_habit(chosen, rejected.lower(), ids) is None
    cands = [Candidate(text=chosen, route="sample", passed=[True] * len(ids)),
             Candidate(text=rejected, route="sample", passed=[False] * len(ids))]
    assert choose(cands, has_constraints=True, constraint_ids=ids, bands=Bands(max_edit_distance=1.0)).reason == \
        "unrequested_habit"
    kept = choose(cands, has_constraints=True, constraint_ids=ids, bands=Bands(max_edit_distance=1.0),
                  drop_unrequested_habits=False)
    assert kept.kept and kept.chosen == 0


def test_chosen_with_an_unrequested_bullet_list_is_dropped():
    """A pair of the fifth GPU run's round 1 (gemma3-270m): the list won on letter counts, and round 2 answered
    half of IFEval with bullets. Asked for a list, or both sides listing, it is a fair pair."""
    from pair_builder.verify import unrequested_habit

    ids = ["keywords:letter_frequency"]
    chosen = ("The causes of the French Revolution are:\n- War with Austria-Hungary\n- Industrial Revolution\n"
              "- Bourgeois democracy")
    rejected = ("The cause of the French Revolution was the revolution of 1789 to replace the old monarchy by a new "
                "one. The revolution was led by the People's")
    assert unrequested_habit(chosen, rejected, ids) == "bullets"
    assert unrequested_habit(chosen, rejected, [*ids, "detectable_format:number_bullet_lists"]) is None
    assert unrequested_habit(chosen, "Causes:\n* debt\n* bread prices", ids) is None
    assert unrequested_habit(rejected, chosen, ids) is None  # the list on the rejected side teaches nothing unasked


def test_a_candidate_that_talks_about_the_fewshot_examples_is_ruled_out():
    """Recorded gemma3-270m answers that talk about the template's haiku / Canberra examples
    (tests/assets/fewshot_answers.jsonl): ruled out once the round's rare example words are known, and only then."""
    from eval.degeneration import fewshot_words

    rows = [json.loads(x) for x in (ASSETS / "fewshot_answers.jsonl").read_text().splitlines()]
    rare = fewshot_words(TEMPLATE.example_texts(), [r["prompt"] for r in rows] * 3 + ["Explain taxes."] * 200)
    idx = EXAMPLES.with_fewshot(rare)
    for r in rows:
        c = Candidate(text=r["response"], route="sample", finish_reason="stop")
        problem = scaffolding_problem(c, idx, r["prompt"], looping=False)
        if r["expect"] and "note" not in r:
            assert problem in ("mentions_fewshot", "copies_example"), r["source"]
        if not r["expect"] and "note" not in r:
            assert problem != "mentions_fewshot", r["source"]
        assert scaffolding_problem(c, EXAMPLES, r["prompt"], looping=False) != "mentions_fewshot"
    assert idx.fewshot == rare and EXAMPLES.fewshot == frozenset()  # with_fewshot copies; the shared index stays
