"""Seed tasks and their train / held-out split: what pair building draws instructions from and what the ``own``
eval suite is built on. Neutral ground, so that neither stage imports the other for it.

A task is ``{"id", "task"}`` from ``constitution/seed_tasks.jsonl`` (or a file of the same form). Tasks are split by
a hash of their id: the ``heldout`` split (the ``own`` eval suite) is never used to build training pairs, so the
eval measures generalisation, not memorisation. The assignment needs no RNG state and does not depend on order.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from shared.atomic import parse_jsonl_lines
from shared.records import content_hash

SEED_TASKS = Path(__file__).resolve().parent.parent / "constitution" / "seed_tasks.jsonl"
HELDOUT_FRACTION = 0.2
Split = Literal["train", "heldout"]


def load_tasks(path: str | os.PathLike[str] | None = None) -> list[dict[str, str]]:
    """Tasks (``id``, ``task``) from a JSONL file; every bad line is reported at once."""
    p = Path(path) if path else SEED_TASKS
    rows, problems = parse_jsonl_lines(p.read_text(encoding="utf-8"))
    tasks, seen = [], set()
    for n, obj in rows:
        if not isinstance(obj, dict) or not isinstance(obj.get("task"), str) or not obj["task"].strip():
            problems.append(f"line {n}: expected an object with a non-empty 'task' string")
            continue
        tid = str(obj.get("id") or content_hash(obj["task"]))
        if tid in seen:
            problems.append(f"line {n}: duplicate id {tid!r}")
            continue
        seen.add(tid)
        tasks.append({"id": tid, "task": obj["task"].strip()})
    if problems:
        raise ValueError(f"{p}: {len(problems)} bad line(s):\n  " + "\n  ".join(problems))
    if not tasks:
        raise ValueError(f"{p}: no tasks; add JSON lines like {{\"id\": \"t1\", \"task\": \"Explain ...\"}}")
    return tasks


def split_of(task_id: str) -> Split:
    """A stable train/heldout assignment from the task id alone (no RNG state, no ordering effects)."""
    h = int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "big") / 2**64
    return "heldout" if h < HELDOUT_FRACTION else "train"
