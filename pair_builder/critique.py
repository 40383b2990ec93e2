"""Critique and rewrite with a base model: few-shot prompts built from a constitution principle.

A base model follows the *form* of a document, so both steps are continuations of one few-shot page:
the principle's examples as ``# Query:`` / ``# Answer:`` / ``# Critique request:`` / ``# Critique:`` /
``# Revision request:`` / ``# Revision:`` blocks, then the item's query and answer. The critique request
carries the checkers' programmatic feedback (which constraints the answer breaks), so the model does not
have to count words itself. The critique ends with a verdict line the examples teach
(``Verdict: NEEDS REVISION`` or ``Verdict: GOOD``), parsed by :func:`parse_verdict`.

    rev = critique_and_revise(client, model, principle, query, answer, failing=["Answer with less than 30 words."],
                              settings=SamplingSettings(), seed=1, usage=Usage())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pair_builder.constitution import VERDICT_RE, Principle
from pair_builder.sample import SamplingSettings, Usage, finished

PREAMBLE = ("# Instructions\n\nBelow are conversations between a human and an AI assistant. After each answer a "
            "careful reviewer critiques it as the critique request asks, then the assistant revises the answer "
            "so that it fully follows the query.")
CRITIQUE_STOP = ["\n# Revision request:", "\n# Revision:", "\n# Query:", "\n# Answer:", "\n# Instructions"]
REVISION_STOP = ["\n# Query:", "\n# Critique", "\n# Answer:", "\n# Revision", "\n# Instructions"]


def checker_feedback(failing: list[str], passing: list[str]) -> str:
    """The checkers' verdicts as text appended to the critique request ('' when there are no constraints)."""
    lines = []
    if failing:
        lines.append("Automatic checks found these constraints broken: " + " | ".join(failing))
    if passing:
        lines.append("Automatic checks found these constraints satisfied: " + " | ".join(passing))
    return "\n".join(lines)


def _block(query: str, answer: str, critique_request: str) -> str:
    return f"# Query:\n{query.strip()}\n\n# Answer:\n{answer.strip()}\n\n# Critique request:\n{critique_request.strip()}"


def critique_prompt(principle: Principle, query: str, answer: str, feedback: str = "") -> str:
    """The few-shot page ending in ``# Critique:`` for ``answer`` to ``query``."""
    shots = [
        f"{_block(ex.query, ex.answer, principle.critique_request)}\n\n# Critique:\n{ex.critique.strip()}\n\n"
        f"# Revision request:\n{principle.revision_request.strip()}\n\n# Revision:\n{ex.revision.strip()}"
        for ex in principle.examples
    ]
    request = principle.critique_request.strip() + (f"\n{feedback.strip()}" if feedback.strip() else "")
    return "\n\n".join([PREAMBLE, *shots, f"{_block(query, answer, request)}\n\n# Critique:\n"])


def revision_prompt(critique_page: str, critique: str, principle: Principle) -> str:
    """The critique page continued with the critique and the revision request, ending in ``# Revision:``."""
    return f"{critique_page}{critique.strip()}\n\n# Revision request:\n{principle.revision_request.strip()}\n\n# Revision:\n"


def parse_verdict(critique: str) -> str | None:
    """``"needs revision"``, ``"good"`` or None when the critique gives no verdict line (the last one wins)."""
    found = VERDICT_RE.findall(critique)
    return found[-1].lower() if found else None


def _merge(stops: Sequence[str], extra: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*stops, *extra]))


@dataclass
class Revision:
    critique: str
    verdict: str | None
    text: str
    finish_reason: str | None
    critique_finish_reason: str | None
    raw: str | None = None  # the rewrite as the server returned it
    cut: bool = False  # it ran on into another turn and was cut there


def critique_and_revise(client: Any, model: str, principle: Principle, query: str, answer: str, *,
                        failing: list[str], passing: list[str], settings: SamplingSettings, seed: int,
                        usage: Usage, extra_stop: Sequence[str] = ()) -> Revision:
    """One critique-rewrite pass: two requests (critique, then revision conditioned on it).

    ``extra_stop``: the answer template's stop strings, so a rewrite ends where an answer would.
    """
    page = critique_prompt(principle, query, answer, checker_feedback(failing, passing))
    common = dict(model=model, temperature=settings.critique_temperature, top_p=settings.top_p, seed=seed)
    resp = client.completions.create(prompt=page, max_tokens=settings.critique_max_tokens, stop=_merge(CRITIQUE_STOP, extra_stop),
                                     **common)
    usage.add(resp)
    critique = resp.choices[0].text.strip()
    resp2 = client.completions.create(prompt=revision_prompt(page, critique, principle),
                                      max_tokens=settings.max_tokens, stop=_merge(REVISION_STOP, extra_stop), **common)
    usage.add(resp2)
    text, finish, cut = finished(resp2.choices[0].text, resp2.choices[0].finish_reason, query,
                                 _merge(REVISION_STOP, extra_stop))
    return Revision(critique=critique, verdict=parse_verdict(critique), text=text, finish_reason=finish,
                    critique_finish_reason=resp.choices[0].finish_reason, raw=resp2.choices[0].text, cut=cut)
