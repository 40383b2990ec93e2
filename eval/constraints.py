"""Verifiable-constraint generator: the project's own instruction-following prompts.

A task from ``constitution/seed_tasks.jsonl`` ("Explain how tides work.") gets 1-3 constraints of the types that
have a sampler in :mod:`eval.checkers` (IFEval's and the project's own)
("Your response should contain at least 3 sentences. Do not include any commas in your response."),
never two that conflict (lm-eval's conflict table, made symmetric). The constraint text is lm-eval's own
``build_description`` and the checker is lm-eval's, so what pair_builder verifies is exactly what eval
scores. Everything is seeded: the same (seed, task) always gives the same prompt.

Tasks and their train / held-out split live in :mod:`shared.tasks`: the ``heldout`` split (the ``own`` eval
suite) is never used to build training pairs. Likewise whole instruction *types* can be held out (``exclude``;
``eval.heldout_types``): pair building never draws them, while the ``own`` suite still does, so every eval can
score instructions the model was never trained on.
"""

from __future__ import annotations

import os
import random
from collections.abc import Collection
from functools import lru_cache
from typing import Any

from eval.checkers import SAMPLERS, project_conflicts
from eval.ifeval import instruction_class
from shared.records import Constraint, content_hash
from shared.tasks import Split, load_tasks, split_of

GENERATED_IDS: tuple[str, ...] = tuple(sorted(SAMPLERS))  # every instruction type with a sampler (eval.checkers)


@lru_cache(maxsize=1)
def conflicts() -> dict[str, frozenset[str]]:
    """lm-eval's conflict table and the project types' own (eval.checkers), made symmetric (if A conflicts with
    B, B conflicts with A) and reflexive."""
    from eval.ifeval import conflict_table

    table = {k: set(v) | {k} for k, v in {**conflict_table(), **project_conflicts()}.items()}
    for k, vs in list(table.items()):
        for v in vs:
            table.setdefault(v, {v}).add(k)
    return {k: frozenset(v) for k, v in table.items()}


def check_heldout_types(ids: Collection[str]) -> list[str]:
    """Problems with a held-out type list (empty = fine): unknown instruction ids, or nothing left to draw."""
    from eval.ifeval import KNOWN_IDS

    problems = [f"{i!r} is not an instruction id (known: {', '.join(KNOWN_IDS)})" for i in ids if i not in KNOWN_IDS]
    if set(GENERATED_IDS) <= set(ids):
        problems.append("every instruction type the constraint generator draws is held out: nothing left to train on")
    return problems


def drawable_ids(exclude: Collection[str] = ()) -> tuple[str, ...]:
    """The generator's ids minus ``exclude`` (unknown ids in ``exclude`` are an error)."""
    problems = check_heldout_types(exclude) if exclude else []
    if problems:
        raise ValueError("held-out instruction types: " + "; ".join(problems))
    return tuple(i for i in GENERATED_IDS if i not in set(exclude))


def sample_constraints(rng: random.Random, k: int, exclude: Collection[str] = ()) -> list[Constraint]:
    """Up to ``k`` mutually compatible constraints (fewer only if the table leaves no compatible id), never
    one of ``exclude`` (held-out instruction types)."""
    table = conflicts()
    chosen: list[Constraint] = []
    blocked: set[str] = set()
    ids = drawable_ids(exclude) if exclude else GENERATED_IDS
    for iid in rng.sample(ids, len(ids)):
        if len(chosen) == k:
            break
        if iid in blocked or any(iid in table.get(c.id, ()) for c in chosen):
            continue
        chosen.append(Constraint(id=iid, kwargs=SAMPLERS[iid](rng)))
        blocked |= table.get(iid, frozenset({iid}))
    return chosen


def describe(c: Constraint) -> str:
    """The constraint's instruction text, from lm-eval's ``build_description``."""
    checker = instruction_class(c.id)(c.id)
    return checker.build_description(**c.kwargs)


def render_prompt(task: str, constraints: list[Constraint]) -> str:
    return " ".join([task.strip(), *(describe(c) for c in constraints)])


def make_item(task: dict[str, str], *, seed: int, variant: int = 0, max_constraints: int = 3,
              exclude: Collection[str] = ()) -> dict[str, Any]:
    """One IFEval-format item (key, prompt, instruction_id_list, kwargs) for a task, deterministic in its inputs;
    ``exclude``: instruction types never to draw (pair building passes the held-out types)."""
    rng = random.Random(f"{seed}:{task['id']}:{variant}")
    cons = sample_constraints(rng, rng.randint(1, max_constraints), exclude)
    return {
        "key": f"own-{content_hash(seed, task['id'], variant)[:12]}",
        "task_id": task["id"],
        "task": task["task"],
        "prompt": render_prompt(task["task"], cons),
        "instruction_id_list": [c.id for c in cons],
        "kwargs": [c.kwargs for c in cons],
    }


def own_suite(*, split: Split = "heldout", seed: int = 1234, variants: int = 2,
              tasks_path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The ``own`` eval suite: every ``split`` task x ``variants`` constraint draws, over every generated type
    (held-out types included: the eval is where they are scored)."""
    tasks = [t for t in load_tasks(tasks_path) if split_of(t["id"]) == split]
    return [make_item(t, seed=seed, variant=v) for t in tasks for v in range(variants)]
