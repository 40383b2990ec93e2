"""Sampling, critique/rewrite prompts, reference log-prob summing and the whole per-item build, with a fake client."""

import re
from types import SimpleNamespace

import openai
import pytest

from pair_builder.build import BuildSettings, build_item, item_id, principle_for
from pair_builder.constitution import load_constitution
from pair_builder.critique import checker_feedback, critique_and_revise, critique_prompt, parse_verdict, revision_prompt
from pair_builder.refscore import completion_logprobs, score_pair
from pair_builder.sample import SamplingSettings, Usage, sample_responses
from pair_builder.sources import Instruction
from pair_builder.verify import Bands
from shared.prompting import load_template
from shared.records import Constraint, PairRecord

TEMPLATE = load_template()
PRINCIPLE = load_constitution().get("follow-every-constraint")


def _tokens(text):
    return re.findall(r"\s*\S+|\s+", text)


class FakeClient:
    """Answers /v1/completions like gen_server: samples, critiques, revisions, echo log-probs (-1 per token)."""

    def __init__(self, samples, critique="Constraint 1: broken.\nVerdict: NEEDS REVISION", revision="fixed answer",
                 fail_on=None):
        self.samples, self.critique, self.revision, self.fail_on = samples, critique, revision, fail_on
        self.calls = []
        self.completions = SimpleNamespace(create=self.create)

    def create(self, **kw):
        self.calls.append(kw)
        usage = SimpleNamespace(prompt_tokens=10, completion_tokens=5)
        prompt = kw["prompt"]
        if self.fail_on and self.fail_on in str(prompt):
            raise openai.APIConnectionError(request=SimpleNamespace())
        if kw.get("echo"):
            choices = []
            for i, text in enumerate(prompt):
                toks = _tokens(text)
                offs = [sum(map(len, toks[:j])) for j in range(len(toks))]
                lps = [None] + [-1.0] * (len(toks) - 1)
                choices.append(SimpleNamespace(index=i, text=text, finish_reason="length", logprobs=SimpleNamespace(
                    tokens=toks, token_logprobs=lps, text_offset=offs, top_logprobs=None)))
            return SimpleNamespace(choices=choices, usage=usage)
        if prompt.endswith("# Critique:\n"):
            texts = [self.critique]
        elif prompt.endswith("# Revision:\n"):
            texts = [self.revision]
        else:
            texts = self.samples[: kw.get("n", 1)]
        return SimpleNamespace(choices=[SimpleNamespace(index=i, text=" " + t, finish_reason="stop")
                                        for i, t in enumerate(texts)], usage=usage)


SETTINGS = BuildSettings(model="m", model_revision="rev1", round=0, sampling=SamplingSettings(k=2, revisions=1),
                         bands=Bands(min_edit_distance=0.0), no_constraint_rule="critique", ref_logprobs=True)
LOWER = Instruction(id="i1", task="Say hi.", text="Say hi. Your entire response should be in lowercase.",
                    constraints=(Constraint(id="change_case:english_lowercase"),))


def test_sample_responses_is_one_request_with_n():
    fc = FakeClient(["First.", "Second."])
    usage = Usage()
    cands = sample_responses(fc, "m", "P", k=2, settings=SamplingSettings(), seed=5, stop=["\n#"], usage=usage)
    assert [c.text for c in cands] == ["First.", "Second."] and all(c.route == "sample" for c in cands)
    assert len(fc.calls) == 1 and fc.calls[0]["n"] == 2 and fc.calls[0]["seed"] == 5
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (1, 10, 5)


def test_critique_and_revision_prompts():
    fb = checker_feedback(["Answer in lowercase."], ["No commas."])
    page = critique_prompt(PRINCIPLE, "Say hi.", "HI THERE", fb)
    assert page.endswith("# Query:\nSay hi.\n\n# Answer:\nHI THERE\n\n# Critique request:\n"
                         + PRINCIPLE.critique_request + "\n" + fb + "\n\n# Critique:\n")
    assert page.count("# Revision:\n") == len(PRINCIPLE.examples)  # the few-shot examples
    rp = revision_prompt(page, "Caps. Verdict: NEEDS REVISION", PRINCIPLE)
    assert rp.startswith(page) and rp.endswith("# Revision request:\n" + PRINCIPLE.revision_request + "\n\n# Revision:\n")
    assert checker_feedback([], []) == ""


def test_parse_verdict():
    assert parse_verdict("ok\nVerdict: GOOD") == "good"
    assert parse_verdict("Verdict: good. Then: verdict: Needs Revision") == "needs revision"
    assert parse_verdict("no verdict here") is None


def test_critique_and_revise_two_requests():
    fc = FakeClient([], critique="Caps used.\nVerdict: NEEDS REVISION", revision="hi there")
    rev = critique_and_revise(fc, "m", PRINCIPLE, "Say hi.", "HI", failing=["lower"], passing=[],
                              settings=SamplingSettings(critique_temperature=0.1), seed=3, usage=Usage())
    assert (rev.text, rev.verdict) == ("hi there", "needs revision")
    assert len(fc.calls) == 2 and all(c["temperature"] == 0.1 for c in fc.calls)
    assert fc.calls[1]["prompt"].startswith(fc.calls[0]["prompt"] + "Caps used.")


def test_logprob_sum_at_the_boundary():
    prompt = ["token_id:1", "token_id:2"]
    chosen = (["token_id:1", "token_id:2", "token_id:7", "token_id:9"], [None, -1.0, -0.5, -0.25])
    rejected = (["token_id:1", "token_id:2", "token_id:8"], [None, -1.0, -2.0])
    lc, lr = completion_logprobs(prompt, [chosen, rejected])
    assert (lc.logp, lc.tokens, lc.straddled) == (-0.75, 2, False)
    assert (lr.logp, lr.tokens, lr.straddled) == (-2.0, 1, False)
    # the prompt's last token merged with the response in one sequence: TRL's boundary is the shorter prefix,
    # for both responses
    merged = (["token_id:1", "token_id:5", "token_id:9"], [None, -3.0, -0.25])
    lc, lr = completion_logprobs(prompt, [merged, rejected])
    assert (lc.logp, lc.tokens, lc.straddled) == (-3.25, 2, True)
    assert (lr.logp, lr.tokens, lr.straddled) == (-3.0, 2, True)
    with pytest.raises(ValueError, match="same length"):
        completion_logprobs(prompt, [(chosen[0], chosen[1][:2])])
    with pytest.raises(ValueError, match="no response tokens"):
        completion_logprobs(prompt, [(prompt, [None, -1.0])])


def test_score_pair_one_request_with_eos():
    fc = FakeClient([])
    lc, lr = score_pair(fc, "m", "Q:\n", "a b c", "d", usage=Usage(), eos=" <eos>")
    assert (lc.logp, lr.logp) == (-4.0, -2.0)  # every response token and the eos
    [call] = fc.calls
    assert call["max_tokens"] == 0 and call["echo"] is True
    assert call["prompt"] == ["Q:\n", "Q:\na b c <eos>", "Q:\nd <eos>"]
    assert call["extra_body"] == {"return_tokens_as_token_ids": True}


def test_build_item_keeps_a_rewrite_pair_with_ref_logps():
    fc = FakeClient(["HELLO THERE FRIEND", "Hi friend."], revision="hello there friend")
    res = build_item(fc, LOWER, PRINCIPLE, settings=SETTINGS, template=TEMPLATE)
    assert res["kept"] and res["route"] == "rewrite" and res["error"] is None
    rec = PairRecord.model_validate(res["record"])
    assert (rec.chosen, rec.rejected, rec.chosen_passed, rec.rejected_passed) == (
        "hello there friend", "HELLO THERE FRIEND", 1, 0)
    assert rec.prompt == TEMPLATE.render(LOWER.text) and rec.ref_chosen_logps == -3.0
    assert res["usage"]["requests"] == 4  # sample, critique, revision, ref scoring
    critique_page = fc.calls[1]["prompt"]
    assert "Automatic checks found these constraints broken: Your entire response should be in" in critique_page
    assert "\n# Answer:\nHELLO THERE FRIEND\n" in critique_page  # the weakest sample is critiqued (first on ties)


def test_build_item_drops_with_a_reason_and_stops_early():
    fc = FakeClient(["hi a", "hi b"], revision="hi c")  # everything passes: no margin
    res = build_item(fc, LOWER, PRINCIPLE, settings=SETTINGS, template=TEMPLATE)
    assert (res["kept"], res["reason"]) == (False, "no_margin")
    two_passes = BuildSettings(**{**SETTINGS.__dict__, "sampling": SamplingSettings(k=2, revisions=2)})
    fc = FakeClient(["HELLO THERE A", "HELLO THERE B"], revision="hello there my friend")  # langdetect: English
    res = build_item(fc, LOWER, PRINCIPLE, settings=two_passes, template=TEMPLATE)
    assert res["n_rewrites"] == 1  # the first rewrite satisfied every constraint: no second pass


def test_build_item_request_error_is_not_a_drop():
    fc = FakeClient(["A", "B"], fail_on="# Critique:")
    res = build_item(fc, LOWER, PRINCIPLE, settings=SETTINGS, template=TEMPLATE)
    assert res["reason"] == "request_error" and res["error"].startswith("APIConnectionError")


def test_ids_are_stable_and_content_addressed():
    c = load_constitution()
    p = principle_for(LOWER, c, seed=0)
    assert p == principle_for(LOWER, c, seed=0)
    a = item_id(LOWER, p.id, SETTINGS, TEMPLATE)
    assert a == item_id(Instruction(**{**LOWER.__dict__, "id": "other-name"}), p.id, SETTINGS, TEMPLATE)
    other_temp = BuildSettings(**{**SETTINGS.__dict__, "sampling": SamplingSettings(temperature=0.5)})
    other_rev = BuildSettings(**{**SETTINGS.__dict__, "model_revision": "rev2"})
    other_text = Instruction(**{**LOWER.__dict__, "text": "Say hello."})
    ids = {a, item_id(LOWER, "x", SETTINGS, TEMPLATE), item_id(LOWER, p.id, other_temp, TEMPLATE),
           item_id(LOWER, p.id, other_rev, TEMPLATE), item_id(other_text, p.id, SETTINGS, TEMPLATE)}
    assert len(ids) == 5


def test_build_item_bad_request_is_a_counted_drop():
    fc = FakeClient(["A", "B"])

    def reject(**kw):
        raise openai.BadRequestError("maximum context length", response=_response(400), body=None)

    fc.completions.create = reject
    res = build_item(fc, LOWER, PRINCIPLE, settings=SETTINGS, template=TEMPLATE)
    assert (res["reason"], res["error"]) == ("bad_request", None)


def _response(status):
    import httpx

    return httpx.Response(status, request=httpx.Request("POST", "http://x/v1/completions"))


def test_build_item_unusable_answer_is_a_counted_drop_not_a_retry():
    fc = FakeClient(["HELLO THERE FRIEND", "Hi friend."], revision="hello there friend")
    real = fc.create

    def no_logprobs(**kw):
        resp = real(**kw)
        if kw.get("echo"):
            for c in resp.choices:
                c.logprobs = None
        return resp

    fc.completions.create = no_logprobs
    res = build_item(fc, LOWER, PRINCIPLE, settings=SETTINGS, template=TEMPLATE)
    assert (res["kept"], res["reason"], res["error"]) == (False, "invalid_response", None)
    assert "no echo log-probs" in res["invalid_response"]
