"""Verify and choose: the eval checkers score every candidate; the rules below pick chosen and rejected.

* a candidate is ruled out (``Candidate.problem``) when it is empty, truncated (finish_reason ``length``),
  leaks scaffolding (a ``# Query:`` echo, a "Here is the revised response" preamble, critique text),
  copies a few-shot example answer of the template or a principle (``copies_example``: a run of
  :data:`COPY_SPAN` or more words shared with one, or all of a shorter one, see :class:`ExampleIndex`) or loops
  (``looping``: :func:`eval.degeneration.is_looping`). Answers that ran on into another turn were already
  cut there (:func:`shared.prompting.cut_at_new_turn`) when sampled;
* chosen = most constraints satisfied; ties go to a rewrite, then to the better critique verdict on it
  ("good" > none > "needs revision"), then to the later pass. With a relevance threshold, only a candidate
  that answers its instruction (:class:`Relevance`: ``Candidate.overlap`` / ``.pmi``, :mod:`pair_builder.relevance`)
  can be chosen (``irrelevant`` when none can);
* rejected = fewest satisfied; ties go to the original response the chosen rewrite came from, then to a
  sample, then to the earlier candidate;
* ``pair_rule="dominance"`` (default): chosen must pass every constraint rejected passes and at least one
  more (chosen candidates are tried in the order above, each against the candidates it dominates;
  ``not_dominant`` when some pair has a count margin but none dominates); ``pair_rule="count"``: chosen
  satisfies strictly more constraints than rejected. Instructions without constraints
  follow ``no_constraint_rule``: ``drop``; ``critique`` (a rewrite beats its original when the critique
  said NEEDS REVISION); ``prefer_rewrite`` (the last rewrite beats its original);
* and only inside the length and edit-distance bands (:class:`Bands`), and not when chosen is all-lowercase or
  all-uppercase though the instruction did not ask for it while rejected is not (``unrequested_habit``: such a
  pair teaches the habit, not the instruction).

Every rejection returns a reason from :data:`DROP_REASONS`, so a run's drops always add up.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rapidfuzz.distance import Levenshtein

from eval.degeneration import is_looping, mentions_fewshot, ngrams, profile, strings_in, words
from eval.ifeval import check
from pair_builder.sample import Candidate
from shared.records import Constraint

NoConstraintRule = Literal["drop", "critique", "prefer_rewrite"]
PairRule = Literal["dominance", "count"]

# Candidate-level problems (the candidate is not used) and item-level drop reasons (no pair kept).
CANDIDATE_PROBLEMS = ("empty", "truncated", "query_echo", "preamble", "critique_leak", "copies_example",
                      "mentions_fewshot", "echoes_instruction", "looping")
DROP_REASONS = (
    "no_valid_candidates", "no_margin", "not_dominant", "irrelevant", "no_constraints", "no_critique_support",
    "identical", "too_short", "too_long", "length_ratio", "too_similar", "too_different", "unrequested_habit", "bad_request", "invalid_response",
    "request_error",
)
# A candidate sharing this many consecutive words with a few-shot example answer copies it (measured on the
# labelled set, tests/assets/labelled_pairs.jsonl: see pair_builder.audit).
COPY_SPAN = 8
MIN_WHOLE = 4  # a whole example of 4..COPY_SPAN-1 words copied counts too


class ExampleIndex:
    """The few-shot example answers a candidate must not copy: the template's answers and every principle's
    example answers, critiques and revisions.

    A candidate copies one when it shares a run of ``span`` words with it, or contains the whole of an example
    shorter than that (at least :data:`MIN_WHOLE` words: "We keep your wheels turning." copied as the answer
    to every kind of question). Word runs the instruction itself contains don't count.
    """

    def __init__(self, texts: list[str], span: int = COPY_SPAN, fewshot: Sequence[str] = ()) -> None:
        self.span = span
        self.fewshot = frozenset(fewshot)  # rare words of the template's examples (eval.degeneration.fewshot_words)
        self.texts = [t for t in texts if t.strip()]
        self._grams = {g for t in self.texts for g in ngrams(words(t), span)}
        self._whole = {tuple(w) for t in self.texts if MIN_WHOLE <= len(w := words(t)) < span}

    @classmethod
    def from_sources(cls, template: Any = None, constitution: Any = None, span: int = COPY_SPAN) -> ExampleIndex:
        texts = [e.answer for e in getattr(template, "examples", [])]
        for p in getattr(constitution, "principles", ()):
            for ex in p.examples:
                texts += [ex.answer, ex.critique, ex.revision]
        return cls(texts, span)

    def copies(self, text: str, instruction: str = "") -> bool:
        """Whether ``text`` copies an example (see the class doc), not counting what the instruction says."""
        toks = words(text)
        hits = ngrams(toks, self.span) & self._grams
        if hits and hits - ngrams(words(instruction), self.span):
            return True
        if self._whole:
            ins = words(instruction)
            grams = {n: (ngrams(toks, n), ngrams(ins, n)) for n in {len(w) for w in self._whole}}
            return any(w in grams[len(w)][0] and w not in grams[len(w)][1] for w in self._whole)
        return False

    def with_fewshot(self, rare: Sequence[str]) -> ExampleIndex:
        """This index, also ruling out answers that talk about the few-shot examples: at least two of ``rare``
        (the examples' words rare among the round's instructions) that the instruction lacks."""
        out = copy.copy(self)
        out.fewshot = frozenset(rare)
        return out

    def mentions(self, text: str, instruction: str = "") -> bool:
        """Whether ``text`` talks about the few-shot examples (:func:`eval.degeneration.mentions_fewshot`)."""
        return mentions_fewshot(text, instruction, self.fewshot)

    def longest_span(self, text: str) -> int:
        """The longest run of words ``text`` shares with any one example (what COPY_SPAN was chosen on)."""
        toks = words(text)
        return max((_longest_common_run(toks, words(t)) for t in self.texts), default=0)


def _longest_common_run(a: list[str], b: list[str]) -> int:
    best = 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best

# A candidate sharing this many consecutive words with its instruction's constraint sentences restates them
# ("SECTION 1 [content of section 1] SECTION 2 ...", "...at the end of your response, please explicitly add a
# postscript"): it passes checkers by accident and teaches "repeat the request". On the first GPU round, 7.5% of
# the kept pairs' chosen answers shared 8 or more words with their instruction, against 2.1% of the rejected.
ECHO_SPAN = 5



def echo_grams(instruction: str, constraints: Sequence[Constraint], span: int = ECHO_SPAN) -> set[tuple[str, ...]]:
    """The word runs of ``instruction``'s constraint sentences that an answer must not restate: all runs of
    ``span`` words of each constraint's description, less those the task itself holds and those of what the
    constraints ask the answer to contain (an end phrase, keywords, a prompt to repeat: the kwargs' strings)."""
    from eval.constraints import describe

    descs = []
    for c in constraints:
        try:
            descs.append(describe(c))
        except Exception:  # noqa: BLE001 - an unknown or odd constraint: nothing to compare with
            continue
    grams = {g for d in descs for g in ngrams(words(d), span)}
    task = instruction
    for d in descs:
        task = task.replace(d, " ")
    allowed = ngrams(words(task), span)
    for c in constraints:
        for v in strings_in(list(c.kwargs.values())):
            allowed |= ngrams(words(v), span)
    return grams - allowed


def restates(text: str, grams: set[tuple[str, ...]]) -> bool:
    """Whether ``text`` holds any of ``grams`` (an instruction's :func:`echo_grams`)."""
    return bool(grams) and bool(ngrams(words(text), len(next(iter(grams)))) & grams)


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


def scaffolding_problem(c: Candidate, examples: ExampleIndex | None = None, instruction: str = "", *,
                        looping: bool = True, echo: set[tuple[str, ...]] | None = None) -> str | None:
    """Why ``c`` cannot be used (one of :data:`CANDIDATE_PROBLEMS`), or None. ``echo``: the instruction's
    :func:`echo_grams`."""
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
    if examples is not None and examples.copies(c.text, instruction):
        return "copies_example"
    if examples is not None and examples.mentions(c.text, instruction):
        return "mentions_fewshot"
    if echo and restates(c.text, echo):
        return "echoes_instruction"
    if looping and is_looping(c.text):
        return "looping"
    return None


def check_text(text: str, instruction_text: str, constraints: list[Constraint]) -> list[bool]:
    """One bool per constraint: does ``text`` satisfy it (strict IFEval)."""
    with _CHECK_LOCK:
        return [check(con.id, con.kwargs, instruction_text, text) for con in constraints]


def score_candidates(candidates: list[Candidate], instruction_text: str, constraints: list[Constraint],
                     examples: ExampleIndex | None = None, *, looping: bool = True) -> None:
    """Fill ``passed`` (one bool per constraint, strict IFEval) and ``problem`` of every candidate."""
    echo = echo_grams(instruction_text, constraints)
    for c in candidates:
        c.passed = check_text(c.text, instruction_text, constraints)
        c.problem = scaffolding_problem(c, examples, instruction_text, looping=looping, echo=echo)


@dataclass(frozen=True)
class Bands:
    min_chars: int = 1
    max_chars: int = 8000
    max_length_ratio: float = 3.0
    min_edit_distance: float = 0.02
    max_edit_distance: float = 0.8  # pairs.max_edit_distance (measured: see shared/config.py)


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


def dominates(a: Sequence[bool], b: Sequence[bool], *, strict: bool = True) -> bool:
    """``a`` passes every constraint ``b`` passes, and (``strict``) at least one more."""
    return all(x or not y for x, y in zip(a, b, strict=True)) and (not strict or sum(a) > sum(b))


@dataclass(frozen=True)
class Relevance:
    """Thresholds a chosen candidate must reach (None = not required; an unscored candidate passes)."""

    min_overlap: float | None = None
    min_pmi: float | None = None

    def ok(self, c: Candidate) -> bool:
        return ((self.min_overlap is None or c.overlap is None or c.overlap >= self.min_overlap)
                and (self.min_pmi is None or c.pmi is None or c.pmi >= self.min_pmi))


def _pick(cands: list[Candidate], valid: list[int], rule: NoConstraintRule, has_constraints: bool,
          pair_rule: PairRule = "dominance", relevance: Relevance = Relevance()) -> tuple[int, int] | str:
    eligible = [i for i in valid if relevance.ok(cands[i])]
    if has_constraints:
        order = sorted(valid, key=lambda i: (cands[i].n_passed, cands[i].route == "rewrite",
                                             _VERDICT_RANK[_verdict_on(cands, i)], cands[i].pass_no, -i), reverse=True)

        def rejected_for(chosen: int, pool: list[int]) -> int:
            parent = cands[chosen].parent
            return min(pool, key=lambda i: (cands[i].n_passed, i != parent, cands[i].route != "sample", i))

        chosen = order[0]
        if cands[chosen].n_passed <= cands[rejected_for(chosen, valid)].n_passed:
            return "no_margin"
        if not eligible:
            return "irrelevant"
        margin = False
        for ci in (i for i in order if i in eligible):
            if pair_rule == "count":
                ri = rejected_for(ci, valid)
                if cands[ci].n_passed > cands[ri].n_passed:
                    return ci, ri
                continue
            below = [i for i in valid if cands[i].n_passed < cands[ci].n_passed]
            margin = margin or bool(below)
            dominated = [i for i in below if dominates(cands[ci].passed, cands[i].passed)]
            if dominated:
                return ci, rejected_for(ci, dominated)
        # an eligible candidate with a margin exists but dominates nothing, or none has a margin
        return "not_dominant" if margin else "irrelevant"
    if rule == "drop":
        return "no_constraints"
    # No checker signal: only a rewrite against the response it came from carries a preference.
    pairs = [(i, cands[i].parent) for i in eligible if cands[i].route == "rewrite" and cands[i].parent in valid]
    if rule == "critique":
        pairs = [(i, p) for i, p in pairs if cands[i].verdict == "needs revision"]
    if not pairs:
        return "no_critique_support"
    return max(pairs, key=lambda ip: (cands[ip[0]].pass_no, ip[0]))


# the habits a pair must not reward unasked (eval.degeneration.HABITS)
PAIR_HABITS = ("lowercase", "uppercase", "bullets")


def unrequested_habit(chosen: str, rejected: str, constraint_ids: Sequence[str]) -> str | None:
    """The habit of :data:`PAIR_HABITS` chosen shows and rejected does not, when the instruction did not ask for
    it; None otherwise. A pair like that rewards the habit itself: DPO learns "write in lowercase" from it and
    applies it to every prompt. Bullets too: in the fifth GPU run's round 1, among pairs not asking for a list,
    43 chosen answers had one against 17 rejected, and round 2 answered half of IFEval with bullets."""
    c, r = profile(chosen, constraint_ids), profile(rejected, constraint_ids)
    return next((h for h in PAIR_HABITS if c[h] and not r[h]), None)


def choose(cands: list[Candidate], *, has_constraints: bool, rule: NoConstraintRule = "critique",
           bands: Bands = Bands(), pair_rule: PairRule = "dominance", relevance: Relevance = Relevance(),
           constraint_ids: Sequence[str] = (), drop_unrequested_habits: bool = True) -> Decision:
    """Pick chosen and rejected among scored candidates (see the module doc for the rules)."""
    valid = [i for i, c in enumerate(cands) if c.problem is None]
    if len(valid) < 2:
        return Decision(None, None, "no_valid_candidates")
    picked = _pick(cands, valid, rule, has_constraints, pair_rule, relevance)
    if isinstance(picked, str):
        return Decision(None, None, picked)
    ci, ri = picked
    chosen, rejected = cands[ci].text, cands[ri].text
    shorter, longer = sorted((len(chosen), len(rejected)))
    dist = Levenshtein.normalized_distance(chosen, rejected)
    # "too different" ignores letter case: an all-lowercase rewrite of its original is a contrast, not unrelated
    dist_ci = Levenshtein.normalized_distance(chosen.lower(), rejected.lower())
    reason = None
    if chosen.strip() == rejected.strip():
        reason = "identical"  # whatever min_edit_distance says: no preference signal (the trainer refuses these)
    elif shorter < bands.min_chars:
        reason = "too_short"
    elif longer > bands.max_chars:
        reason = "too_long"
    elif longer > bands.max_length_ratio * shorter:
        reason = "length_ratio"
    elif dist < bands.min_edit_distance:
        reason = "too_similar"
    elif dist_ci > bands.max_edit_distance:
        reason = "too_different"
    elif drop_unrequested_habits and unrequested_habit(chosen, rejected, constraint_ids):
        reason = "unrequested_habit"
    return Decision(ci, ri, reason, round(dist, 4))
