"""Does a response answer its instruction? Task-word overlap (free), or pointwise mutual information (one request).

**Task-word overlap** (:func:`task_overlap`, ``pairs.min_task_overlap``, on by default): the share of the task's
content words (the instruction without its constraint sentences, stop words dropped, plural ``s`` and word
endings folded: first 5 letters) that the response uses. A response about something else shares none:
"welcome to be creative in every step of the process." for "Give advice to someone starting their first job
as a software developer", a copied "Cooking at home costs much less..." for "Explain the difference between
weather and climate". On the 186 hand-labelled pairs (tests/assets/labelled_pairs.jsonl) it separates chosen
answers labelled irrelevant better (ROC AUC 0.82) than PMI below (0.63 over both models, 0.76 on SmolLM2's
pairs alone: its scale differs between models), costs nothing, and PMI adds no recall on top of it. At 0.2:
precision 0.86, recall 0.68 (0.1: 0.91/0.63, 0.3: 0.80/0.74); ``python -m pair_builder.audit --labelled ... --sweep``.

**PMI** (:func:`pmi_scores`, ``pairs.min_pmi``, off by default): the base model reads the response and is asked which task it answers: the score is the per-token gain in
log-probability of the task given the response, over the task alone,

    pmi = (log p(task | "# Answer:\\n{response}\\n\\n# Query this answers:\\n") - log p(task | "# Query this answers:\\n")) / tokens

An answer about the task makes the task's words likelier (pmi > 0); a copied example, an answer to another
question or boilerplate ("welcome to be creative in every step of the process.") does not. The task is the
instruction without its constraint sentences (``Instruction.task``): constraint wording is predictable from
any response and only dilutes the signal. All of an item's candidates and the unconditioned task go in one
``/v1/completions`` request with ``echo=True, max_tokens=0, logprobs=1`` (the embedded server and vLLM
both answer it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pair_builder.sample import Candidate, Usage

_STOP_WORDS = frozenset(
    "a an the of for to in on and or is are be how what why who when which write give explain describe your about "
    "from with as at by it its that this these some someone their them they you short brief new make list tell "
    "into over under one two three four five first second".split())
_WORD = re.compile(r"[a-z]+")


def _stem(w: str) -> str:
    return (w[:-1] if len(w) > 3 and w.endswith("s") else w)[:5]


def _stems(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower())}


def task_words(task: str) -> set[str]:
    """The task's content-word stems (what a response about the task would use)."""
    return {_stem(w) for w in _WORD.findall(task.lower()) if w not in _STOP_WORDS and len(w) > 2}


def task_overlap(task: str, response: str) -> float | None:
    """Share of the task's content words the response uses (None: the task has none to measure)."""
    tw = task_words(task)
    return len(tw & _stems(response)) / len(tw) if tw else None


ANSWER_HEAD = "# Answer:\n"
QUERY_HEAD = "# Query this answers:\n"
MAX_RESPONSE_CHARS = 2000  # the response's start says what it is about; keeps the request small


def relevance_prompts(task: str, responses: Sequence[str]) -> tuple[list[str], list[int]]:
    """The unconditioned text, then one text per response; and where the task starts in each."""
    task = task.strip()
    texts = [QUERY_HEAD + task] + [f"{ANSWER_HEAD}{r.strip()[:MAX_RESPONSE_CHARS]}\n\n{QUERY_HEAD}{task}" for r in responses]
    return texts, [len(t) - len(task) for t in texts]


def _task_logprob(logprobs: Any, start: int) -> tuple[float, int]:
    """Summed log-prob and count of the tokens that begin at or after ``start`` (the task's tokens)."""
    total, n = 0.0, 0
    for off, lp in zip(logprobs.text_offset, logprobs.token_logprobs, strict=False):
        if off >= start and lp is not None:
            total += lp
            n += 1
    return total, n


def pmi_scores(client: Any, model: str, task: str, responses: Sequence[str], *, usage: Usage | None = None) -> list[float]:
    """Per-token PMI of ``task`` given each response (see the module doc); one request."""
    if not responses:
        return []
    texts, starts = relevance_prompts(task, responses)
    resp = client.completions.create(model=model, prompt=texts, max_tokens=0, echo=True, logprobs=1, temperature=0.0)
    if usage is not None:
        usage.add(resp)
    choices = sorted(resp.choices, key=lambda c: c.index)
    if len(choices) != len(texts) or any(c.logprobs is None for c in choices):
        raise ValueError("the server returned no echo log-probs (relevance needs /v1/completions with echo=True, "
                         "logprobs=1, as gen_server answers); set pairs.min_relevance=null for other servers")
    base, n = _task_logprob(choices[0].logprobs, starts[0])
    out = []
    for c, s in zip(choices[1:], starts[1:], strict=True):
        cond, m = _task_logprob(c.logprobs, s)
        out.append(round((cond - base) / max(n, m, 1), 4))
    return out


def score_overlap(task: str, candidates: list[Candidate]) -> None:
    """Fill ``overlap`` of ``candidates`` (no request)."""
    for c in candidates:
        c.overlap = task_overlap(task, c.text)


def score_pmi(client: Any, model: str, task: str, candidates: list[Candidate], *, usage: Usage) -> None:
    """Fill ``pmi`` of ``candidates`` (one request)."""
    for c, s in zip(candidates, pmi_scores(client, model, task, [c.text for c in candidates], usage=usage), strict=True):
        c.pmi = s
