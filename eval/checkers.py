"""Instruction types: one registry of checkers, samplers and conflicts, layered over lm-eval's IFEval checkers.

An instruction type is three things: a **checker** (does a response follow it?), a **sampler** (the kwargs of
one draw, for the constraint generator, :mod:`eval.constraints`) and the types it **conflicts** with (never
drawn together). IFEval's 25 types come from lm-eval (their checkers and conflict table; the samplers are
below). The project adds its own here, and every stage then sees them: pair building draws and verifies them,
eval scores them strictly and loosely through lm-eval's own test functions, and ``eval.heldout_types`` may
hold them out. The official 541-prompt IFEval suite never asks for them, so its scores do not change.

How to add a checker (the worked example is :class:`NoRepeatedSentence`, ``project:no_repeated_sentence``):

1. Write a class with lm-eval's ``Instruction`` interface: ``__init__(instruction_id)``;
   ``build_description(**kwargs) -> str``, the sentence appended to a task (it also keeps the kwargs);
   ``get_instruction_args() -> dict`` and ``get_instruction_args_keys() -> list``; and
   ``check_following(response) -> bool``.
2. Register it at the bottom of this module: ``register("project:my_type", MyChecker, sampler=lambda rng:
   {...}, conflicts=("other:type",))``. ``sampler=None`` makes it checkable (user suites, user pair files)
   but never drawn. Ids outside IFEval take the ``project:`` prefix.
3. Test it in ``tests/unit/test_eval_checkers.py``: its verdicts on real answers, and a generated item that
   asks for it, scored through :func:`eval.ifeval.score_response`.

:func:`install` puts the project's checkers into lm-eval's ``INSTRUCTION_DICT``; :mod:`eval.ifeval` calls it
once, on import, so no caller patches lm-eval by hand.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from eval.degeneration import repeats_sentence

Sampler = Callable[[random.Random], dict[str, Any]]

_RELATIONS = ("less than", "at least")
_KEYWORDS = ("example", "simple", "future", "balance", "community", "careful", "surprise", "energy",
             "history", "patience", "reason", "detail", "important", "morning", "journey", "quality")
_FORBIDDEN = ("very", "really", "thing", "good", "great", "basically", "just", "also", "many", "lot")
_END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have additional questions.",
                "Any other questions?", "That is all.")
_LETTERS = "aeinorst"

# IFEval instruction id -> kwargs sampler. Ids left out need task-specific inputs (repeat_prompt,
# constrained_response, nth_paragraph_first_word) or a non-English task (response_language): checkable, not drawn.
SAMPLERS: dict[str, Sampler] = {
    "punctuation:no_comma": lambda r: {},
    "change_case:english_lowercase": lambda r: {},
    "change_case:english_capital": lambda r: {},
    "change_case:capital_word_frequency": lambda r: {
        "capital_frequency": r.randint(2, 5), "capital_relation": r.choice(_RELATIONS)},
    "detectable_format:title": lambda r: {},
    "detectable_format:json_format": lambda r: {},
    "detectable_format:number_bullet_lists": lambda r: {"num_bullets": r.randint(2, 5)},
    "detectable_format:number_highlighted_sections": lambda r: {"num_highlights": r.randint(1, 3)},
    "detectable_format:multiple_sections": lambda r: {
        "section_spliter": r.choice(("Section", "SECTION", "PART")), "num_sections": r.randint(2, 4)},
    "length_constraints:number_words": lambda r: {
        "num_words": r.choice((40, 60, 80, 120, 200)), "relation": r.choice(_RELATIONS)},
    "length_constraints:number_sentences": lambda r: {
        "num_sentences": r.randint(2, 8), "relation": r.choice(_RELATIONS)},
    "length_constraints:number_paragraphs": lambda r: {"num_paragraphs": r.randint(2, 4)},
    "keywords:existence": lambda r: {"keywords": r.sample(_KEYWORDS, 2)},
    "keywords:forbidden_words": lambda r: {"forbidden_words": r.sample(_FORBIDDEN, 2)},
    "keywords:frequency": lambda r: {
        "keyword": r.choice(_KEYWORDS), "frequency": r.randint(2, 3), "relation": "at least"},
    "keywords:letter_frequency": lambda r: {
        "letter": r.choice(_LETTERS), "let_frequency": r.randint(3, 8), "let_relation": r.choice(_RELATIONS)},
    "detectable_content:postscript": lambda r: {"postscript_marker": r.choice(("P.S.", "P.P.S"))},
    "detectable_content:number_placeholders": lambda r: {"num_placeholders": r.randint(1, 3)},
    "startend:end_checker": lambda r: {"end_phrase": r.choice(_END_PHRASES)},
    "startend:quotation": lambda r: {},
    "combination:two_responses": lambda r: {},
}


@dataclass(frozen=True)
class ProjectType:
    checker: type
    conflicts: frozenset[str]


PROJECT: dict[str, ProjectType] = {}  # the project's own instruction types, by id
_installed: list[ModuleType] = []


def register(instruction_id: str, checker: type, *, sampler: Sampler | None = None,
             conflicts: Collection[str] = ()) -> None:
    """Add an instruction type of the project's own (see the module doc)."""
    if not instruction_id.startswith("project:"):
        raise ValueError(f"{instruction_id!r}: the project's own instruction ids start with 'project:'")
    if instruction_id in PROJECT:
        raise ValueError(f"{instruction_id!r} is already registered")
    PROJECT[instruction_id] = ProjectType(checker, frozenset(conflicts))
    if sampler is not None:
        SAMPLERS[instruction_id] = sampler
    for lm_registry in _installed:
        lm_registry.INSTRUCTION_DICT[instruction_id] = checker


def install(lm_registry: ModuleType) -> None:
    """Make lm-eval's test functions (strict and loose) find the project's checkers too."""
    for iid, t in PROJECT.items():
        lm_registry.INSTRUCTION_DICT[iid] = t.checker
    _installed.append(lm_registry)


def project_conflicts() -> dict[str, frozenset[str]]:
    """The conflicts the project's types declare (made symmetric by :func:`eval.constraints.conflicts`)."""
    return {iid: t.conflicts for iid, t in PROJECT.items()}


class NoRepeatedSentence:
    """``project:no_repeated_sentence``: no sentence or line (of two or more words) is said twice
    (:func:`eval.degeneration.repeats_sentence`). A base model loops in a third of its answers; asked, this
    instruction gives pair building checker pairs whose chosen answer does not repeat itself and whose
    rejected one does - "do not loop" taught by the instruction's own verdict, at no length cost."""

    def __init__(self, instruction_id: str) -> None:
        self.id = instruction_id

    def build_description(self, **kwargs: Any) -> str:
        return "Do not repeat yourself: say each sentence only once."

    def get_instruction_args(self) -> dict[str, Any]:
        return {}

    def get_instruction_args_keys(self) -> list[str]:
        return []

    def check_following(self, value: str) -> bool:
        return bool(value.strip()) and not repeats_sentence(value)


register("project:no_repeated_sentence", NoRepeatedSentence, sampler=lambda r: {},
         conflicts=("combination:repeat_prompt", "combination:two_responses"))
