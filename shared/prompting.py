"""Base-model prompting: the few-shot template that turns an instruction into a /v1/completions prompt.

A base model has no chat template. Eval, pair building and DPO training all render instructions through
the same :class:`BaseTemplate` (``constitution/base_template.yaml`` by default), so the prompt the trainer
conditions on is exactly the text the server was prompted with.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "constitution" / "base_template.yaml"


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class BaseTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1)
    preamble: str
    query_prefix: str = Field(min_length=1)
    answer_prefix: str = Field(min_length=1)
    separator: str = "\n\n"
    stop: list[str] = Field(min_length=1)
    examples: list[Example] = Field(default_factory=list)

    @property
    def sha256(self) -> str:
        """Identifies the template in pair ids and dataset cards: any edit changes it."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    def example_texts(self) -> list[str]:
        """Every few-shot query and answer: what a model may come to talk about instead of its prompt
        (:func:`eval.degeneration.fewshot_words`)."""
        return [t for e in self.examples for t in (e.query, e.answer)]

    def _turn(self, query: str, answer: str | None) -> str:
        head = f"{self.query_prefix}{query.strip()}\n\n{self.answer_prefix}"
        return head if answer is None else head + answer.strip()

    def cut(self, completion: str, instruction: str = "") -> tuple[str, bool]:
        """A completion of :meth:`render` cut where the model starts another turn (:func:`cut_at_new_turn`),
        also at this template's own stop strings and query prefix (servers that ignore ``stop``)."""
        return cut_at_new_turn(completion, instruction, [*self.stop, "\n" + self.query_prefix.strip()])

    def instruction_of(self, prompt: str) -> str:
        """The instruction a :meth:`render`-ed prompt asks (between the last query prefix and the answer prefix)."""
        head = prompt.rsplit(self.query_prefix, 1)[-1]
        return head.rsplit(self.answer_prefix, 1)[0].strip()

    def render(self, instruction: str) -> str:
        """The full prompt for ``instruction``; the model's completion is the answer."""
        parts = [self.preamble.strip()] + [self._turn(e.query, e.answer) for e in self.examples]
        parts.append(self._turn(instruction, None))
        return self.separator.join(parts)


# A line that opens another turn: the model has finished its answer and goes on to invent the next query.
# Keyword families; a family is not cut when the instruction itself mentions one of its context words (a
# quiz the instruction asked for has "Question 2:" lines, a requested dialogue has "User:" lines).
_TURN_FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # family: (keywords, context words in the instruction that make them legitimate content)
    "template": (("query", "instruction", "instructions"), ()),
    "question": (("question", "q", "request", "prompt", "task", "input"),
                 ("question", "questions", "quiz", "faq", "q&a", "interview", "trivia", "prompt", "prompts", "task",
                  "tasks", "input", "request")),
    "speaker": (("human", "user", "assistant"),
                ("dialogue", "dialog", "conversation", "script", "chat", "interview", "transcript", "roleplay",
                 "role-play", "exchange", "user", "users")),
}
# Keywords that open a turn only as a markdown header ("### Instruction:", "# Task:"): as plain labels they are
# everyday content ("Instructions:" in a recipe, "Task: buy milk" in a to-do list).
_HEADER_ONLY = {"instruction", "instructions", "request", "prompt", "task", "input"}
_KW = "|".join(sorted({k for ks, _ in _TURN_FAMILIES.values() for k in ks}, key=len, reverse=True))
# "# Question:", "### Instruction:", "**User:**", "Q:", "Question 2:", "Human:" at a line start; or a markdown
# header made of the keyword alone ("### Instruction", "# Instructions").
_TURN_LINE = re.compile(
    rf"^[ \t]*(?:(?P<hash>(?:#{{1,6}}[ \t]*)+)|\*\*|__)?(?P<kw>{_KW})(?P<num>[ \t]*\d{{1,3}})?[ \t]*(?:\*\*|__)?[ \t]*"
    rf"(?::|(?(hash)$|(?!)))", re.IGNORECASE)
# "# Answer:" / "### Response:" / a bare "# Response" header: the answer slot of a new example; and the
# critique-revision page's own blocks ("# Rewrite:", "# Rewrite the answer so that...", "# Critique request").
_ANSWER_HEADER = re.compile(r"^[ \t]*(?:#{1,6}[ \t]*)+(?:(?:answer|response|output)[ \t]*(?::|$)|(?:rewrite|revision|critique)\b)",
                            re.IGNORECASE)


def _family(kw: str) -> str:
    kw = kw.lower()
    return next(f for f, (ks, _) in _TURN_FAMILIES.items() if kw in ks)


def _exempt(instruction: str) -> set[str]:
    """Families the instruction itself asks for (its words), so their lines are content, not a new turn."""
    words = set(re.findall(r"[a-z&-]+", instruction.lower()))
    return {f for f, (_, ctx) in _TURN_FAMILIES.items() if words & set(ctx)}


def new_turn_at(text: str, instruction: str = "", extra: Iterable[str] = ()) -> int | None:
    """Character offset of the first line (after the first line with content) that opens another turn.

    Forms: ``# Query:``, ``# Question:``, ``# Request:``, ``### Instruction``, ``# Instructions``, ``Human:``,
    ``User:``, ``Q:``, ``Question:`` ... at a line start (markdown ``#`` or ``**`` around them is allowed),
    ``# Answer:`` / ``### Response:`` headers, the critique page's ``# Rewrite`` / ``# Revision`` /
    ``# Critique`` headers, and any of ``extra`` (the template's stop strings) anywhere.
    Not a new turn: the first line (nothing was answered before it), "SECTION 1" headers, "Q&A" or
    "the user:" inside a line, and plain or numbered forms of keyword families the instruction itself mentions
    ("Question 2:" in a quiz, "User:" in a dialogue it asked for; see ``_TURN_FAMILIES``).
    """
    exempt = _exempt(instruction)
    cut: int | None = None
    for s in extra:
        s_at = text.find(s, 1)
        while s_at != -1 and not text[:s_at].strip():
            s_at = text.find(s, s_at + 1)
        if s_at != -1 and (cut is None or s_at < cut):
            cut = s_at
    seen_content = False
    pos = 0
    for line in text.splitlines(keepends=True):
        if cut is not None and pos >= cut:
            break
        if seen_content:
            m = _TURN_LINE.match(line)
            if m and m.group("kw").lower() in _HEADER_ONLY and not m.group("hash"):
                m = None
            # a "# Question:" header in the template's style is a new example even when the instruction is
            # about questions; plain or numbered forms ("Question 2:", "## Question 1") are content it asked for
            asked = m is not None and _family(m.group("kw")) in exempt and (not m.group("hash") or m.group("num"))
            if (m and not asked) or _ANSWER_HEADER.match(line.rstrip("\r\n")):
                return pos if cut is None else min(pos, cut)
        if line.strip():
            seen_content = True
        pos += len(line)
    return cut


def cut_at_new_turn(text: str, instruction: str = "", extra: Iterable[str] = ()) -> tuple[str, bool]:
    """``text`` up to where the model starts another turn (see :func:`new_turn_at`), stripped; and whether it cut.

    An answer cut here is a finished answer: the model ended it and went on to a new example.
    """
    at = new_turn_at(text, instruction, extra)
    if at is None:
        return text.strip(), False
    return text[:at].strip(), True


def load_template(path: str | os.PathLike[str] | None = None) -> BaseTemplate:
    p = Path(path) if path else DEFAULT_TEMPLATE
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt template not found: {p} (see constitution/base_template.yaml)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ValueError(f"{p}: not a valid YAML prompt template{at} ({getattr(e, 'problem', None) or e}); "
                         "see constitution/base_template.yaml for the format") from None
    try:
        return BaseTemplate.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ValueError(f"{p}: invalid prompt template: {problems}") from None
