"""One instruction -> one preference pair (or a counted reason why not): the plain function actors run.

sample k -> critique the weakest sample against the item's principle (with checker feedback) -> rewrite,
up to R passes (each pass critiques the previous rewrite; stops early once every constraint holds) ->
score all candidates -> choose -> reference log-probs of the kept pair. Pure except for the client, so a
fake client tests it end to end; the result is a JSON-able dict the driver writes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import openai

from eval.constraints import describe
from pair_builder.constitution import Constitution, Principle
from pair_builder.critique import critique_and_revise
from pair_builder.extras import extra_id, item_extras
from pair_builder.refscore import score_responses
from pair_builder.sample import Candidate, SamplingSettings, Usage, request_seed, sample_responses
from pair_builder.sources import Instruction
from pair_builder.relevance import score_overlap, score_pmi
from pair_builder.verify import (
    COPY_SPAN,
    Bands,
    ExampleIndex,
    NoConstraintRule,
    PairRule,
    Relevance,
    check_text,
    choose,
    score_candidates,
)
from shared.prompting import BaseTemplate
from shared.records import PairRecord, content_hash, pair_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildSettings:
    """Everything an actor needs besides the client; identical on every actor of a run."""

    model: str
    model_revision: str
    round: int
    sampling: SamplingSettings
    bands: Bands
    no_constraint_rule: NoConstraintRule
    ref_logprobs: bool
    eos_token: str | None = None  # appended to responses when scoring reference log-probs (as TRL does)
    record_candidates: bool = False  # every candidate (raw text, checks, problem) goes to .meta/candidates.jsonl
    pair_rule: PairRule = "dominance"  # chosen passes every constraint rejected passes, plus one ("count": more)
    copy_span: int = COPY_SPAN  # rule out candidates sharing this many words with a few-shot example; 0 = off
    rule_out_looping: bool = True  # rule out candidates eval.degeneration.is_looping calls looping
    relevance: Relevance = Relevance()  # what chosen must reach: task-word overlap, PMI (pair_builder.relevance)
    drop_unrequested_habits: bool = True  # no pair whose chosen is all-lower/upper-case unasked (verify.unrequested_habit)
    stop_pairs: bool = False  # collect stop-pair candidates (pair_builder.extras)
    habit_contrast: bool = False  # collect habit-contrast candidates (pair_builder.extras)
    repair: bool = False  # collect format-repair candidates (pair_builder.repair)
    no_repair: tuple[str, ...] = ()  # instruction ids never repaired (the eval's held-out types)

    def id_settings(self, template: BaseTemplate) -> dict[str, Any]:
        """The sampling settings hashed into pair ids (the template is part of what the model was asked)."""
        return {**self.sampling.as_dict(), "template": template.sha256, "round": self.round}


def principle_for(instruction: Instruction, constitution: Constitution, seed: int) -> Principle:
    """The item's principle, drawn from a seed and the instruction's content (stable across runs)."""
    return constitution.sample(content_hash(seed, instruction.text, [c.model_dump() for c in instruction.constraints]))


def item_id(instruction: Instruction, principle_id: str, settings: BuildSettings, template: BaseTemplate) -> str:
    """The pair id: content hash of instruction, constraints, principle, sampling settings, model revision."""
    return pair_id(instruction.text, list(instruction.constraints), principle_id, settings.id_settings(template),
                   settings.model_revision)


def _weakest(cands: list[Candidate]) -> int | None:
    """The sample to critique: fewest constraints met among usable samples (non-empty if none is usable)."""
    pool = [i for i, c in enumerate(cands) if c.problem is None] or [i for i, c in enumerate(cands) if c.text]
    return min(pool, key=lambda i: (cands[i].n_passed, i)) if pool else None


def example_index(settings: BuildSettings, template: BaseTemplate, constitution: Any) -> ExampleIndex | None:
    """The few-shot answers candidates must not copy (None when ``copy_span`` is 0)."""
    return ExampleIndex.from_sources(template, constitution, settings.copy_span) if settings.copy_span else None


def build_item(client: Any, instruction: Instruction, principle: Principle, *, settings: BuildSettings,
               template: BaseTemplate, examples: ExampleIndex | None = None) -> dict[str, Any]:
    """Build the pair for one instruction; the result records the pair or the drop reason, and the cost.

    ``examples``: few-shot answers a candidate must not copy (:func:`example_index`); None = no such check.
    """
    iid = item_id(instruction, principle.id, settings, template)
    usage = Usage()
    result: dict[str, Any] = {"id": iid, "instruction_id": instruction.id, "kept": False, "reason": None,
                              "route": None, "n_constraints": len(instruction.constraints), "record": None,
                              "error": None}
    try:
        _build(client, instruction, principle, iid, settings, template, usage, result, examples)
    except openai.BadRequestError as e:
        # Deterministic (e.g. prompt + max_tokens over the context length): retrying cannot help, so it is a drop.
        log.warning("item %s: server rejected a request: %s", iid, e)
        result.update(kept=False, reason="bad_request", record=None, bad_request=str(e)[:300])
    except (openai.APIError, json.JSONDecodeError) as e:
        # Transient after the client's retries (connection, timeout, 5xx, a body that is not JSON): not marked
        # done, so a resubmitted job retries the item.
        # `unreachable`: the server could not be reached at all (the worker gives the item to another server).
        log.warning("item %s failed: %s", iid, e)
        result.update(kept=False, reason="request_error", record=None, error=f"{type(e).__name__}: {e}",
                      unreachable=isinstance(e, openai.APIConnectionError))
    except ValueError as e:
        # An answer that cannot be used (no echo log-probs, a response with no tokens): asking again gets the
        # same answer, so it is a counted drop, not an item every resubmission retries.
        log.warning("item %s: unusable answer: %s", iid, e)
        result.update(kept=False, reason="invalid_response", record=None, invalid_response=str(e)[:300])
    result["usage"] = vars(usage)
    return result


def _build(client: Any, ins: Instruction, principle: Principle, iid: str, settings: BuildSettings,
           template: BaseTemplate, usage: Usage, result: dict[str, Any], examples: ExampleIndex | None) -> None:
    s = settings.sampling
    cons = list(ins.constraints)
    prompt = template.render(ins.text)
    cands = sample_responses(client, settings.model, prompt, k=s.k, settings=s, seed=request_seed(iid, "sample"),
                             stop=template.stop, usage=usage, instruction=ins.text)

    def score(cs: list[Candidate]) -> None:
        score_candidates(cs, ins.text, cons, examples, looping=settings.rule_out_looping)

    score(cands)
    target = _weakest(cands)
    for pass_no in range(1, s.revisions + 1):
        if target is None:
            break
        t = cands[target]
        rev = critique_and_revise(
            client, settings.model, principle, ins.text, t.text,
            failing=[describe(c) for c, ok in zip(cons, t.passed, strict=True) if not ok],
            passing=[describe(c) for c, ok in zip(cons, t.passed, strict=True) if ok],
            settings=s, seed=request_seed(iid, "revise", pass_no), usage=usage, extra_stop=template.stop,
        )
        new = Candidate(text=rev.text, route="rewrite", finish_reason=rev.finish_reason, parent=target,
                        pass_no=pass_no, critique=rev.critique, verdict=rev.verdict, raw=rev.raw)
        score([new])
        new.cut = rev.cut
        cands.append(new)
        if new.problem is not None or (cons and all(new.passed)):
            break  # nothing usable to critique further, or nothing left to fix
        target = len(cands) - 1
    usable = [c for c in cands if c.problem is None]
    if settings.relevance.min_overlap is not None:
        score_overlap(ins.task or ins.text, usable)
    if settings.relevance.min_pmi is not None and len(usable) >= 2:
        # one request scores every usable candidate; only the chosen must reach the threshold
        score_pmi(client, settings.model, ins.task or ins.text, usable, usage=usage)
    decision = choose(cands, has_constraints=bool(cons), rule=settings.no_constraint_rule, bands=settings.bands,
                      pair_rule=settings.pair_rule, relevance=settings.relevance,
                      constraint_ids=[c.id for c in cons], drop_unrequested_habits=settings.drop_unrequested_habits)
    samples = [c for c in cands if c.route == "sample"]
    rewrites = [c for c in cands if c.route == "rewrite"]
    result.update(
        reason=decision.reason,
        candidate_problems=dict(Counter(c.problem for c in cands if c.problem)),
        cut_turns=sum(c.cut for c in cands),
        n_samples=len(samples), n_rewrites=len(rewrites),
        sample_passed=[c.n_passed for c in samples], rewrite_passed=[c.n_passed for c in rewrites],
        verdicts=dict(Counter(str(c.verdict) for c in rewrites)),
        edit_distance=decision.edit_distance,
    )
    if settings.record_candidates:
        result["candidates"] = {"instruction": ins.text, "constraints": [c.model_dump() for c in cons],
                                "principle_id": principle.id, "chosen": decision.chosen, "rejected": decision.rejected,
                                "reason": decision.reason, "candidates": [c.as_record() for c in cands]}
    extras = item_extras(cands, kept=(decision.chosen, decision.rejected) if decision.kept else None,
                         constraint_ids=[c.id for c in cons], check=lambda t: check_text(t, ins.text, cons),
                         relevance=settings.relevance, stop=settings.stop_pairs, contrast=settings.habit_contrast,
                         repair=settings.repair, constraints=cons, no_repair=settings.no_repair)
    if not decision.kept and not extras:
        return
    texts: list[str] = []  # every response to score, once
    if decision.kept:
        texts += [cands[decision.chosen].text, cands[decision.rejected].text]
    for x in extras:
        texts += [t for t in (x["chosen"], x["rejected"]) if t not in texts]
    logps: dict[str, float | None] = dict.fromkeys(texts)
    if settings.ref_logprobs:
        scored = score_responses(client, settings.model, prompt, texts, usage=usage, eos=settings.eos_token or "")
        logps = {t: s.logp for t, s in zip(texts, scored, strict=True)}
        result["ref_straddled"] = sum(s.straddled for s in scored)

    def record(rid: str, principle_id: str, chosen: str, rejected: str, chosen_passed: int,
               rejected_passed: int) -> PairRecord:
        return PairRecord(
            id=rid, prompt=prompt, chosen=chosen, rejected=rejected, instruction_id=ins.id,
            constraints=json.dumps([c.model_dump() for c in cons], sort_keys=True), principle_id=principle_id,
            chosen_passed=chosen_passed, rejected_passed=rejected_passed, model=settings.model,
            round=settings.round, ref_chosen_logps=logps[chosen], ref_rejected_logps=logps[rejected])

    if extras:
        result["extras"] = [{"kind": x["kind"], "record": record(extra_id(iid, x["kind"]), x["kind"], x["chosen"],
                                                                  x["rejected"], x["chosen_passed"],
                                                                  x["rejected_passed"]).model_dump()}
                            for x in extras]
    if not decision.kept:
        return
    chosen, rejected = cands[decision.chosen], cands[decision.rejected]
    rec = record(iid, principle.id, chosen.text, rejected.text, chosen.n_passed, rejected.n_passed)
    result.update(chosen_finish=chosen.finish_reason, rejected_finish=rejected.finish_reason,
                  chosen_passed_list=chosen.passed, rejected_passed_list=rejected.passed, task=ins.task,
                  chosen_overlap=chosen.overlap, chosen_pmi=chosen.pmi)
    result.update(kept=True, route=chosen.route, record=rec.model_dump(), chosen_passed=chosen.n_passed,
                  rejected_passed=rejected.n_passed, chosen_chars=len(chosen.text), rejected_chars=len(rejected.text))
