"""Verify and choose: the eval checkers score every candidate; the rules below pick chosen and rejected.

* a candidate is ruled out (``Candidate.problem``) when it is empty, truncated (finish_reason ``length``)
  or leaks scaffolding: a ``# Query:`` echo, a "Here is the revised response" preamble, critique text;
* chosen = most constraints satisfied; ties go to a rewrite, then to the better critique verdict on it
  ("good" > none > "needs revision"), then to the later pass;
* rejected = fewest satisfied; ties go to the original response the chosen rewrite came from, then to a
  sample, then to the earlier candidate;
* kept only if chosen satisfies strictly more constraints than rejected. Instructions without constraints
  follow ``no_constraint_rule``: ``drop``; ``critique`` (a rewrite beats its original when the critique
  said NEEDS REVISION); ``prefer_rewrite`` (the last rewrite beats its original);
* and only inside the length and edit-distance bands (:class:`Bands`).

Every rejection returns a reason from :data:`DROP_REASONS`, so a run's drops always add up.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Literal

from rapidfuzz.distance import Levenshtein

from eval.ifeval import check
from pair_builder.sample import Candidate
from shared.records import Constraint

NoConstraintRule = Literal["drop", "critique", "prefer_rewrite"]

# Candidate-level problems (the candidate is not used) and item-level drop reasons (no pair kept).
CANDIDATE_PROBLEMS = ("empty", "truncated", "query_echo", "preamble", "critique_leak")
DROP_REASONS = (
    "no_valid_candidates", "no_margin", "no_constraints", "no_critique_support", "too_short", "too_long",
    "length_ratio", "too_similar", "too_different", "bad_request", "request_error",
)

_ECHO = re.compile(r"^#\s*(query|answer)\s*:|^#\s*instructions\s*$", re.IGNORECASE | re.MULTILINE)
_PREAMBLE = re.compile(
    r"^\W*(sure|okay|ok|certainly|of course)?[\s!,.]*"
    r"(here('s| is| are)|below is|this is)\s+(the|a|an|my)\s+"
    r"(revised|rewritten|improved|updated|corrected|new|edited|final)\b", re.IGNORECASE)
_PREAMBLE_LABEL = re.compile(r"^\W*(revised|rewritten|improved|updated|corrected)\s+(answer|response|version)\s*:",
                             re.IGNORECASE)
_CRITIQUE = re.compile(r"#+\s*(critique|revision)|critique request|revision request|\bverdict\s*:\s*(needs revision|good)"
                       r"|\bthe critique\b|automatic checks found", re.IGNORECASE)

# lm-eval's checkers draw missing kwargs from the process-global `random`, seeded per prompt by
# eval.ifeval.check; actors call this from several threads, so checks must not interleave.
_CHECK_LOCK = threading.Lock()


def scaffolding_problem(c: Candidate) -> str | None:
    """Why ``c`` cannot be used (one of :data:`CANDIDATE_PROBLEMS`), or None."""
    if not c.text.strip():
        return "empty"
    if c.finish_reason == "length":
        return "truncated"
    if _ECHO.search(c.text):
        return "query_echo"
    if _PREAMBLE.search(c.text) or _PREAMBLE_LABEL.search(c.text):
        return "preamble"
    if _CRITIQUE.search(c.text):
        return "critique_leak"
    if c.route == "rewrite" and c.critique and len(c.critique) >= 40 and c.critique.strip() in c.text:
        return "critique_leak"
    return None


def score_candidates(candidates: list[Candidate], instruction_text: str, constraints: list[Constraint]) -> None:
    """Fill ``passed`` (one bool per constraint, strict IFEval) and ``problem`` of every candidate."""
    for c in candidates:
        with _CHECK_LOCK:
            c.passed = [check(con.id, con.kwargs, instruction_text, c.text) for con in constraints]
        c.problem = scaffolding_problem(c)


@dataclass(frozen=True)
class Bands:
    min_chars: int = 1
    max_chars: int = 8000
    max_length_ratio: float = 3.0
    min_edit_distance: float = 0.02
    max_edit_distance: float = 1.0


@dataclass(frozen=True)
class Decision:
    """The outcome for one item: a pair (chosen/rejected indices) or the reason there is none."""

    chosen: int | None
    rejected: int | None
    reason: str | None  # None = kept
    edit_distance: float | None = None

    @property
    def kept(self) -> bool:
        return self.reason is None


_VERDICT_RANK = {"good": 2, None: 1, "needs revision": 0}


def _verdict_on(cands: list[Candidate], i: int) -> str | None:
    """The verdict a later critique gave on candidate ``i`` (None if it was never critiqued)."""
    return next((c.verdict for c in cands if c.parent == i), None)


def _pick(cands: list[Candidate], valid: list[int], rule: NoConstraintRule, has_constraints: bool) -> tuple[int, int] | str:
    if has_constraints:
        chosen = max(valid, key=lambda i: (cands[i].n_passed, cands[i].route == "rewrite",
                                           _VERDICT_RANK[_verdict_on(cands, i)], cands[i].pass_no, -i))
        parent = cands[chosen].parent
        rejected = min(valid, key=lambda i: (cands[i].n_passed, i != parent, cands[i].route != "sample", i))
        if cands[chosen].n_passed <= cands[rejected].n_passed:
            return "no_margin"
        return chosen, rejected
    if rule == "drop":
        return "no_constraints"
    # No checker signal: only a rewrite against the response it came from carries a preference.
    pairs = [(i, cands[i].parent) for i in valid if cands[i].route == "rewrite" and cands[i].parent in valid]
    if rule == "critique":
        pairs = [(i, p) for i, p in pairs if cands[i].verdict == "needs revision"]
    if not pairs:
        return "no_critique_support"
    return max(pairs, key=lambda ip: (cands[ip[0]].pass_no, ip[0]))


def choose(cands: list[Candidate], *, has_constraints: bool, rule: NoConstraintRule = "critique",
           bands: Bands = Bands()) -> Decision:
    """Pick chosen and rejected among scored candidates (see the module doc for the rules)."""
    valid = [i for i, c in enumerate(cands) if c.problem is None]
    if len(valid) < 2:
        return Decision(None, None, "no_valid_candidates")
    picked = _pick(cands, valid, rule, has_constraints)
    if isinstance(picked, str):
        return Decision(None, None, picked)
    ci, ri = picked
    chosen, rejected = cands[ci].text, cands[ri].text
    shorter, longer = sorted((len(chosen), len(rejected)))
    dist = Levenshtein.normalized_distance(chosen, rejected)
    reason = None
    if shorter < bands.min_chars:
        reason = "too_short"
    elif longer > bands.max_chars:
        reason = "too_long"
    elif longer > bands.max_length_ratio * shorter:
        reason = "length_ratio"
    elif dist < bands.min_edit_distance:
        reason = "too_similar"
    elif dist > bands.max_edit_distance:
        reason = "too_different"
    return Decision(ci, ri, reason, round(dist, 4))
