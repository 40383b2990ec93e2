"""Sampling from the served base model: k responses per prompt in ONE request (``n=k``), plus token accounting.

Every function takes an OpenAI client (sync) and returns plain data, so it is tested with a fake client
and wrapped by a Ray actor unchanged. Request seeds derive from the item id: a rerun asks the same thing.

    client = make_client(url, key)
    cands = sample_responses(client, "smollm2-135m", prompt, k=4, settings=SamplingSettings(), seed=7,
                             stop=template.stop, usage=Usage())
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from shared.prompting import cut_at_new_turn

log = logging.getLogger(__name__)

Route = Literal["sample", "rewrite"]


@dataclass
class Usage:
    """Tokens and requests one piece of work cost (summed into progress, the ledger and stats)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, resp: Any) -> None:
        self.requests += 1
        u = getattr(resp, "usage", None)
        if u is not None:
            self.prompt_tokens += u.prompt_tokens or 0
            self.completion_tokens += u.completion_tokens or 0


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that changes what the model is asked; part of every pair id."""

    k: int = 2
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    revisions: int = 1
    critique_max_tokens: int = 160
    critique_temperature: float = 0.3
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Candidate:
    """A response to score: one of the k samples, or a rewrite of ``parent`` after critique pass ``pass_no``."""

    text: str
    route: Route
    finish_reason: str | None = None
    parent: int | None = None  # index (in the item's candidate list) of the response this rewrites
    pass_no: int = 0
    critique: str | None = None  # the critique this rewrite answered
    verdict: str | None = None  # that critique's verdict on the parent: "needs revision" | "good" | None
    passed: list[bool] = field(default_factory=list)  # per constraint, filled by verify.score_candidates
    problem: str | None = None  # scaffolding/truncation reason that rules it out, filled by verify
    raw: str | None = None  # the completion as the server returned it (before stripping and cutting)
    cut: bool = False  # it ran on into another turn and was cut there (a finished answer)
    overlap: float | None = None  # share of the task's content words it uses (pair_builder.relevance)
    pmi: float | None = None  # relevance under the model (pair_builder.relevance); None = not scored

    def as_record(self) -> dict[str, Any]:
        """What ``pairs.record_candidates`` writes to ``.meta/candidates.jsonl``."""
        return {"route": self.route, "text": self.text, "raw": self.raw, "finish_reason": self.finish_reason,
                "parent": self.parent, "pass_no": self.pass_no, "verdict": self.verdict, "critique": self.critique,
                "passed": [bool(x) for x in self.passed], "problem": self.problem, "cut": self.cut,
                "overlap": self.overlap, "pmi": self.pmi}

    @property
    def n_passed(self) -> int:
        return sum(self.passed)


def request_seed(*parts: Any) -> int:
    """A 31-bit request seed from the item id and request role (vLLM and the embedded server take ints)."""
    from shared.records import content_hash

    return int(content_hash(*parts)[:8], 16) & 0x7FFFFFFF


def finished(text: str, finish_reason: str | None, instruction: str, stop: list[str]) -> tuple[str, str | None, bool]:
    """``text`` cut where the model starts another turn (:func:`shared.prompting.cut_at_new_turn`), the finish
    reason (a cut answer ended: ``stop``, even if the server ran on to ``length``), and whether it was cut."""
    cut_text, cut = cut_at_new_turn(text, instruction, stop)
    return cut_text, ("stop" if cut else finish_reason), cut


def sample_responses(client: Any, model: str, prompt: str, *, k: int, settings: SamplingSettings, seed: int,
                     stop: list[str], usage: Usage, instruction: str = "") -> list[Candidate]:
    """``k`` sampled completions of ``prompt`` (one request, ``n=k``) as sample candidates, each cut where the
    model starts another turn (``instruction`` says which turn-like lines are content it asked for)."""
    resp = client.completions.create(
        model=model, prompt=prompt, n=k, max_tokens=settings.max_tokens, temperature=settings.temperature,
        top_p=settings.top_p, stop=stop, seed=seed,
    )
    usage.add(resp)
    choices = sorted(resp.choices, key=lambda c: c.index)
    out = []
    for c in choices:
        text, finish, cut = finished(c.text, c.finish_reason, instruction, stop)
        out.append(Candidate(text=text, route="sample", finish_reason=finish, raw=c.text, cut=cut))
    return out
