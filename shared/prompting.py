"""Base-model prompting: the few-shot template that turns an instruction into a /v1/completions prompt.

A base model has no chat template. Eval, pair building and DPO training all render instructions through
the same :class:`BaseTemplate` (``constitution/base_template.yaml`` by default), so the prompt the trainer
conditions on is exactly the text the server was prompted with.
"""

from __future__ import annotations

import hashlib
import os
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

    def _turn(self, query: str, answer: str | None) -> str:
        head = f"{self.query_prefix}{query.strip()}\n\n{self.answer_prefix}"
        return head if answer is None else head + answer.strip()

    def render(self, instruction: str) -> str:
        """The full prompt for ``instruction``; the model's completion is the answer."""
        parts = [self.preamble.strip()] + [self._turn(e.query, e.answer) for e in self.examples]
        parts.append(self._turn(instruction, None))
        return self.separator.join(parts)


def load_template(path: str | os.PathLike[str] | None = None) -> BaseTemplate:
    p = Path(path) if path else DEFAULT_TEMPLATE
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt template not found: {p} (see constitution/base_template.yaml)") from None
    try:
        return BaseTemplate.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ValueError(f"{p}: invalid prompt template: {problems}") from None
