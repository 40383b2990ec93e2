"""The constitution: Stage 1 principles (instruction following) loaded from ``constitution/principles/*.yaml``.

Each file holds one principle: ``id``, ``description``, ``critique_request``, ``revision_request`` and 1-2
few-shot ``examples`` (query, answer, critique, revision). :func:`load_constitution` validates every file
and raises one :class:`ConstitutionError` listing every problem (missing fields, duplicate ids, an empty
directory), so a typo is found before any request is sent. ``Constitution.sha256`` identifies it in the
pairs dir's manifest (pairs of two constitutions never mix) and in the dataset card.

    python -c "from pair_builder.constitution import load_constitution as l; print(l().sha256)"
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "constitution" / "principles"
VERDICT_RE = re.compile(r"verdict:\s*(needs revision|good)\b", re.IGNORECASE)


class ConstitutionError(ValueError):
    """The constitution is malformed; the message lists every problem and the file it is in."""

    def __init__(self, problems: list[str], source: Path) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"constitution {source}: {len(problems)} problem(s):\n{lines}")


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    query: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    critique: str = Field(min_length=1, description="Ends with 'Verdict: NEEDS REVISION' or 'Verdict: GOOD'.")
    revision: str = Field(min_length=1)


class Principle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str = Field(min_length=1)
    critique_request: str = Field(min_length=1)
    revision_request: str = Field(min_length=1)
    examples: list[Example] = Field(min_length=1, max_length=4)


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    source: Path

    @property
    def sha256(self) -> str:
        """Changes with any edit to any principle (file names and order do not matter)."""
        blob = json.dumps(sorted((p.model_dump() for p in self.principles), key=lambda d: d["id"]), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.principles]

    def get(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise KeyError(f"no principle {principle_id!r} in {self.source}; known: {', '.join(self.ids)}")

    def sample(self, key: str) -> Principle:
        """The principle for an item, drawn from a seed string (the same key always gives the same one)."""
        return random.Random(key).choice(self.principles)


def load_constitution(path: str | os.PathLike[str] | None = None) -> Constitution:
    """Load and validate every ``*.yaml`` principle in ``path`` (a directory or one file); report all problems."""
    src = Path(path) if path else DEFAULT_DIR
    if src.is_dir():
        files = sorted([*src.glob("*.yaml"), *src.glob("*.yml")])
    elif src.is_file():
        files = [src]
    else:
        raise ConstitutionError([f"not found (pass a directory of principle YAML files, default {DEFAULT_DIR})"], src)
    if not files:
        raise ConstitutionError(["no *.yaml principle files (add one per principle, see constitution/principles/)"], src)
    problems: list[str] = []
    principles: list[Principle] = []
    first_file: dict[str, str] = {}
    for f in files:
        try:
            data = yaml.safe_load(f.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            problems.append(f"{f.name}: not valid YAML ({e})")
            continue
        if not isinstance(data, dict):
            problems.append(f"{f.name}: expected a mapping with id, description, critique_request, "
                            f"revision_request, examples; got {type(data).__name__}")
            continue
        try:
            p = Principle.model_validate(data)
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(x) for x in err["loc"]) or "<root>"
                msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
                problems.append(f"{f.name}: {loc}: {msg}")
            continue
        for i, ex in enumerate(p.examples):
            if not VERDICT_RE.search(ex.critique):
                problems.append(f"{f.name}: examples.{i}.critique: must end with 'Verdict: NEEDS REVISION' or "
                                f"'Verdict: GOOD' (the model learns to give a parseable verdict from it)")
        if p.id in first_file:
            problems.append(f"{f.name}: duplicate id {p.id!r} (first in {first_file[p.id]}); ids must be unique")
            continue
        first_file[p.id] = f.name
        principles.append(p)
    if problems:
        raise ConstitutionError(problems, src)
    return Constitution(tuple(principles), src)
