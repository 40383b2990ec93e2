"""Format repairs: the model's own answer made, by rule, to follow the format instructions it missed.

A base model's samples almost never show a requested format: on gemma3-270m's third GPU round, the 50 checker
pairs whose instruction asked for a postscript, sections, bullets, paragraphs, highlights, two responses or
JSON almost all won on another constraint, with a chosen answer that ignored the format. The trained model
then wrote one plain sentence for every prompt, and lost the format instructions the base model had passed by
restating the request (docs/runs/base-gpu/run-3). No sample shows the format, so no checker pair can teach it,
and at 270M the critique-and-rewrite step does not produce one either (6 of 247 chosen answers were rewrites).

Where a format has a mechanical form, the rule writes it: :func:`repair` takes a finished answer and the
item's constraints and applies each format it can (:data:`REPAIRS`): its sentences grouped into the asked
number of paragraphs, sections or bullets, the first sentences highlighted, the last one moved into the asked
postscript, a second candidate added as the second response, the asked end phrase appended, or the whole
wrapped as JSON. The checkers then decide: :func:`best_repair` keeps the variant (all repairs together, or
each alone) that passes every constraint the answer passed and more. The words stay the model's own; only
the format changes, so the pair (repaired against as written, ``pair_builder.extras``) says one thing:
"this is what the instruction asked for".

Instruction types without a mechanical form (keywords, word counts, a title's wording, placeholders) have no
repair, nor do the types held out from training (``eval.heldout_types``: a held-out gain must come from
generalisation, never from a rule written for it). Case and punctuation are habits, taught and balanced by
the checker and contrast pairs instead (``pair_builder.extras``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

_SENTENCE = re.compile(r"[^.!?]+(?:[.!?]+|$)")


_LIST_MARK = re.compile(r"^\s*(?:[-•]|\d+[.)])\s+", re.MULTILINE)


def sentences(text: str) -> list[str]:
    """``text``'s sentences, whitespace collapsed and list marks ("- ", "1. ") dropped: line breaks are not kept,
    the repairs lay the text out."""
    flat = " ".join(_LIST_MARK.sub("", text).split())
    return [s.strip() for s in _SENTENCE.findall(flat) if s.strip()]


def groups(items: Sequence[str], n: int) -> list[list[str]] | None:
    """``items`` in ``n`` contiguous non-empty groups, as even as possible; None when there are fewer than n."""
    if n < 1 or len(items) < n:
        return None
    q, r = divmod(len(items), n)
    out, i = [], 0
    for g in range(n):
        size = q + (g < r)
        out.append(list(items[i:i + size]))
        i += size
    return out


@dataclass
class Plan:
    """What one repair asks of the answer's layout: filled in by the :data:`REPAIRS` that apply, then
    :meth:`render`-ed in a fixed order (body, postscript, second response, end phrase, JSON)."""

    structure: tuple[str, int, str] | None = None  # ("paragraphs"|"sections"|"bullets", n, section word)
    highlights: int = 0
    postscript: str | None = None  # its marker
    second: str | None = None  # the second response
    end: str | None = None
    as_json: bool = False

    def render(self, text: str) -> str | None:
        sents = sentences(text)
        ps = None
        if self.postscript:
            if len(sents) < 2:
                return None
            ps = sents.pop()
        if self.highlights:
            if len(sents) < self.highlights or self.structure and self.structure[0] == "bullets":
                return None
            sents = [f"*{s}*" if i < self.highlights else s for i, s in enumerate(sents)]
        if self.structure:
            kind, n, word = self.structure
            parts = groups(sents, n)
            if parts is None:
                return None
            bodies = [" ".join(p) for p in parts]
            if kind == "paragraphs":
                body = "\n\n***\n\n".join(bodies)
            elif kind == "sections":
                body = "\n\n".join(f"{word} {i}\n{b}" for i, b in enumerate(bodies, 1))
            else:
                body = "\n".join(f"* {b}" for b in bodies)
        else:
            body = " ".join(sents)
        if ps is not None:
            body += f"\n\n{self.postscript} {ps}"
        if self.second is not None:
            body += f"\n\n******\n\n{' '.join(self.second.split())}"
        if self.end is not None:
            body += f"\n\n{self.end}"
        if self.as_json:
            body = json.dumps({"answer": body}, ensure_ascii=False)
        return body


# instruction id -> how it changes the plan (kwargs, the other usable answers); False: cannot apply here
Repair = Callable[[Plan, dict[str, Any], Sequence[str]], bool]


def _paragraphs(p: Plan, kw: dict[str, Any], others: Sequence[str]) -> bool:
    p.structure = ("paragraphs", int(kw["num_paragraphs"]), "")
    return True


def _sections(p: Plan, kw: dict[str, Any], others: Sequence[str]) -> bool:
    p.structure = ("sections", int(kw["num_sections"]), str(kw["section_spliter"]))
    return True


def _bullets(p: Plan, kw: dict[str, Any], others: Sequence[str]) -> bool:
    p.structure = ("bullets", int(kw["num_bullets"]), "")
    return True


def _highlights(p: Plan, kw: dict[str, Any], others: Sequence[str]) -> bool:
    p.highlights = int(kw["num_highlights"])
    return True


def _postscript(p: Plan, kw: dict[str, Any], others: Sequence[str]) -> bool:
    p.postscript = str(kw.get("postscript_marker") or "P.S.")
    return True


def _two_responses(p: Plan, kw: dict[str, Any], others: Sequence[str]) -> bool:
    if not others:
        return False
    p.second = others[0]
    return True


def _end(p: Plan, kw: dict[str, Any], others: Sequence[str]) -> bool:
    p.end = str(kw["end_phrase"]).strip()
    return True


def _json(p: Plan, kw: dict[str, Any], others: Sequence[str]) -> bool:
    p.as_json = True
    return True


REPAIRS: dict[str, Repair] = {
    "length_constraints:number_paragraphs": _paragraphs,
    "detectable_format:multiple_sections": _sections,
    "detectable_format:number_bullet_lists": _bullets,
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_content:postscript": _postscript,
    "combination:two_responses": _two_responses,
    "startend:end_checker": _end,
    "detectable_format:json_format": _json,
}


def variants(text: str, constraints: Sequence[Any], *, others: Sequence[str] = (),
             exclude: Collection[str] = ()) -> list[str]:
    """The repaired texts to try for ``text``: every applicable repair together, then each alone (distinct,
    in that order). ``constraints``: objects or dicts with ``id`` and ``kwargs``; ``exclude``: instruction
    ids never repaired (the held-out types)."""
    todo = []
    for c in constraints:
        cid, kw = (c["id"], c.get("kwargs") or {}) if isinstance(c, dict) else (c.id, c.kwargs or {})
        if cid in REPAIRS and cid not in exclude:
            todo.append((cid, kw))
    if not todo or "*" in text:  # the answer's own asterisks would be read as highlights, bullets or dividers
        return []
    out: list[str] = []
    for subset in ([*todo], *([t] for t in todo)) if len(todo) > 1 else ([*todo],):
        plan = Plan()
        try:
            if not all(REPAIRS[cid](plan, kw, others) for cid, kw in subset):
                continue
            done = plan.render(text)
        except (KeyError, TypeError, ValueError):  # kwargs the repair cannot read: no repair
            continue
        if done and done.strip() != text.strip() and done not in out:
            out.append(done)
    return out


def best_repair(text: str, passed: Sequence[bool], constraints: Sequence[Any], check: Callable[[str], list[bool]],
                *, others: Sequence[str] = (), exclude: Collection[str] = ()) -> tuple[str, list[bool]] | None:
    """The repaired ``text`` (:func:`variants`) that passes every constraint ``text`` passes (``passed``) and
    the most besides, with its verdicts (``check``); None when no variant passes more."""
    best = None
    for v in variants(text, constraints, others=others, exclude=exclude):
        got = check(v)
        if all(g or not p for g, p in zip(got, passed, strict=True)) and sum(got) > sum(passed):
            if best is None or sum(got) > sum(best[1]):
                best = (v, got)
    return best


def same_ending(chosen: str, rejected: str, words: int = 3) -> bool:
    """Whether the two answers end in the same ``words`` words. A repair that changes where the answer ends (an
    end phrase, a JSON wrapper, a second response, a highlighted last sentence) teaches DPO to lower the
    probability of stopping after the answer as written: the rejected side's last token is the only place the
    pair differs there."""
    a, b = chosen.split(), rejected.split()
    return len(a) >= words and a[-words:] == b[-words:]
