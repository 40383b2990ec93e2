"""Instructions for pair building: the seed pool, self-instruct tasks, a user file; dedupe; diversity summary.

* seed pool: every ``train``-split task (:mod:`shared.tasks`) of ``constitution/seed_tasks.jsonl`` x
  ``seed_variants`` constraint draws (``eval.constraints.make_item``: the same generator and checkers eval uses; the ``heldout`` split
  is never used, and the held-out instruction types ``eval.heldout_types`` are never drawn, so eval
  measures generalisation);
* self-instruct: the served model continues a numbered list of seed tasks (base-model prompt), one new
  task per line; junk lines are filtered and each new task gets constraints like a seed task;
* a user file (JSONL or parquet): ``instruction`` (used verbatim) or ``task`` (constraint text appended),
  optional ``constraints`` (list of ``{"id", "kwargs"}``).

:func:`dedupe` removes exact duplicates and near-duplicate tasks (MinHash LSH over character 5-grams),
including any task that nearly copies a held-out eval task. :func:`diversity_summary` describes the rest.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasketch import MinHash, MinHashLSH

from eval.constraints import make_item, render_prompt
from shared.tasks import load_tasks, split_of
from eval.ifeval import instruction_class
from pair_builder.sample import Usage
from shared.atomic import parse_jsonl_lines
from shared.config import DEFAULT_HELDOUT_TYPES
from shared.records import Constraint, content_hash

log = logging.getLogger(__name__)

SOURCE_PRIORITY = ("seed", "file", "self_instruct")  # which copy of a near-duplicate survives


@dataclass(frozen=True)
class Instruction:
    """One instruction to build a pair for: ``text`` is what the model is asked (task + constraint text)."""

    id: str
    task: str
    text: str
    constraints: tuple[Constraint, ...] = ()
    source: str = "seed"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "text": self.text, "source": self.source,
                "constraints": [c.model_dump() for c in self.constraints]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Instruction:
        return cls(id=d["id"], task=d["task"], text=d["text"], source=d["source"],
                   constraints=tuple(Constraint.model_validate(c) for c in d["constraints"]))


def _from_item(item: dict[str, Any], source: str) -> Instruction:
    cons = tuple(Constraint(id=i, kwargs=kw) for i, kw in zip(item["instruction_id_list"], item["kwargs"], strict=True))
    return Instruction(id=item["key"], task=item["task"], text=item["prompt"], constraints=cons, source=source)


def _excluded(exclude: Collection[str] | None) -> tuple[str, ...]:
    """The instruction types never to draw: ``eval.heldout_types``; None = its default list."""
    return tuple(DEFAULT_HELDOUT_TYPES if exclude is None else exclude)


def seed_instructions(*, seed: int, variants: int, max_constraints: int,
                      tasks_path: str | os.PathLike[str] | None = None,
                      exclude: Collection[str] | None = None) -> list[Instruction]:
    """Train-split seed tasks x ``variants`` seeded constraint draws, never of a type in ``exclude`` (pass
    ``cfg.eval.heldout_types``; None = its default)."""
    tasks = [t for t in load_tasks(tasks_path) if split_of(t["id"]) == "train"]
    ex = _excluded(exclude)
    return [_from_item(make_item(t, seed=seed, variant=v, max_constraints=max_constraints, exclude=ex), "seed")
            for t in tasks for v in range(variants)]


def constrain_tasks(tasks: list[str], *, seed: int, max_constraints: int, source: str,
                    exclude: Collection[str] | None = None) -> list[Instruction]:
    """Give new task texts seeded constraints, exactly as seed tasks get theirs (``exclude`` likewise)."""
    ex = _excluded(exclude)
    return [_from_item(make_item({"id": content_hash(source, t), "task": t}, seed=seed,
                                 max_constraints=max_constraints, exclude=ex), source) for t in tasks]


# --- self-instruct -----------------------------------------------------------------------------------------

SELF_INSTRUCT_PREAMBLE = ("Below is a list of tasks that people asked an AI assistant to do. The tasks are "
                          "varied: writing, explaining, advising, planning, summarising, comparing and more. "
                          "Each task is one self-contained sentence or two.")
_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s*(.*)$")
_TASK_OK = re.compile(r"^[A-Z][^\n]{13,298}[.?!]$")
_JUNK = re.compile(r"https?://|#\s*(query|answer)|\b(task|tasks)\s*\d|\bAI assistant\b|^\W", re.IGNORECASE)


def self_instruct_prompt(examples: list[str]) -> str:
    """A numbered list of example tasks ending in the next number: the model writes the next tasks."""
    lines = [f"{i}. {t}" for i, t in enumerate(examples, 1)]
    return "\n".join([SELF_INSTRUCT_PREAMBLE, "", *lines, f"{len(examples) + 1}."])


def parse_tasks(completion: str) -> list[str]:
    """New tasks from a completion of :func:`self_instruct_prompt`, junk removed.

    The completion starts mid-line (the prompt ended with the next number), so its first line is a task;
    later lines must be numbered. A task must read as one: capitalised, 15-300 chars, ending in . ? or !,
    no URLs, no template scaffolding, no mention of the list itself.
    """
    out: list[str] = []
    for i, raw in enumerate(completion.split("\n")):
        if i == 0:
            text = raw
        else:
            m = _NUMBERED.match(raw)
            if not m:
                break  # the list ended; anything after is not a task
            text = m.group(2)
        text = " ".join(text.split())
        if _TASK_OK.match(text) and not _JUNK.search(text):
            out.append(text)
    return out


# --- user file ---------------------------------------------------------------------------------------------

def _check_constraints(raw: Any, where: str, problems: list[str]) -> tuple[Constraint, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            problems.append(f"{where}: constraints is a string but not JSON")
            return ()
    if not isinstance(raw, list):
        problems.append(f"{where}: constraints must be a list of {{\"id\": ..., \"kwargs\": {{...}}}}")
        return ()
    cons = []
    for j, c in enumerate(raw):
        try:
            con = Constraint.model_validate(c)
            instruction_class(con.id)
            cons.append(con)
        except (ValueError, KeyError) as e:
            problems.append(f"{where}: constraints[{j}]: {str(e).splitlines()[0]}")
    return tuple(cons)


def file_instructions(path: str | os.PathLike[str]) -> list[Instruction]:
    """Instructions from a user JSONL or parquet file; every bad row is reported at once."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pairs.input_file {p} does not exist (give a JSONL or parquet file)")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(p).to_pylist()
    else:
        parsed, problems = parse_jsonl_lines(p.read_text(encoding="utf-8"))
        rows = [obj for _, obj in parsed]
        if problems:
            raise ValueError(f"{p}: {len(problems)} bad line(s):\n  " + "\n  ".join(problems))
    out, problems = [], []
    for n, row in enumerate(rows, 1):
        where = f"row {n}"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object with 'instruction' or 'task'")
            continue
        cons = _check_constraints(row.get("constraints"), where, problems)
        if isinstance(row.get("instruction"), str) and row["instruction"].strip():
            text = task = row["instruction"].strip()
        elif isinstance(row.get("task"), str) and row["task"].strip():
            task = row["task"].strip()
            text = render_prompt(task, list(cons)) if cons else task
        else:
            problems.append(f"{where}: needs a non-empty 'instruction' or 'task' string")
            continue
        iid = str(row.get("id") or f"file-{content_hash(text, [c.model_dump() for c in cons])[:12]}")
        out.append(Instruction(id=iid, task=task, text=text, constraints=cons, source="file"))
    if problems:
        raise ValueError(f"{p}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    if not out:
        raise ValueError(f"{p} holds no instructions: give one JSON object per line, with 'instruction' or 'task'")
    return out


# --- dedupe and diversity ----------------------------------------------------------------------------------

def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def _minhash(text: str, num_perm: int) -> MinHash:
    s = _normalize(text)
    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch([s[i:i + 5].encode() for i in range(max(1, len(s) - 4))])
    return m


@dataclass
class DedupeReport:
    exact: int = 0
    near: int = 0
    heldout: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)  # (dropped task, the task it copies)


def dedupe(instructions: list[Instruction], *, threshold: float = 0.8, blocklist: list[str] = (),
           num_perm: int = 64) -> tuple[list[Instruction], DedupeReport]:
    """Drop exact duplicates (same text and constraints) and near-duplicate tasks.

    Variants of one task with different constraints are kept: they are different instructions by design.
    Between near-duplicate *tasks*, the higher-priority source's task survives (seed, then file, then
    self-instruct). A task near a ``blocklist`` text (the held-out eval tasks) is always dropped.
    """
    report = DedupeReport()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept_task: dict[str, str] = {}  # normalized task -> its key in the LSH (first seen wins)
    for j, text in enumerate(blocklist):
        lsh.insert(f"block-{j}", _minhash(text, num_perm))
    block_text = {f"block-{j}": t for j, t in enumerate(blocklist)}
    task_of: dict[str, str] = {}
    order = sorted(range(len(instructions)), key=lambda i: SOURCE_PRIORITY.index(instructions[i].source)
                   if instructions[i].source in SOURCE_PRIORITY else len(SOURCE_PRIORITY))
    keep_idx, seen_exact = [], set()
    for i in order:
        ins = instructions[i]
        exact = (_normalize(ins.text), json.dumps([c.model_dump() for c in ins.constraints], sort_keys=True))
        if exact in seen_exact:
            report.exact += 1
            continue
        norm = _normalize(ins.task)
        if norm not in kept_task:
            m = _minhash(ins.task, num_perm)
            hits = lsh.query(m)
            if hits:
                first = sorted(hits)[0]
                if first.startswith("block-"):
                    report.heldout += 1
                    report.examples.append((ins.task, block_text[first]))
                else:
                    report.near += 1
                    report.examples.append((ins.task, task_of[first]))
                continue
            key = f"task-{len(kept_task)}"
            lsh.insert(key, m)
            kept_task[norm] = key
            task_of[key] = ins.task
        seen_exact.add(exact)
        keep_idx.append(i)
    kept = [instructions[i] for i in sorted(keep_idx)]
    log.info("dedupe: %d -> %d instructions (%d exact, %d near-duplicate, %d near a held-out task)",
             len(instructions), len(kept), report.exact, report.near, report.heldout)
    return kept, report


def diversity_summary(instructions: list[Instruction], top: int = 20) -> dict[str, Any]:
    """Leading verbs, constraint mix, sources and task lengths (words) of an instruction set."""
    lengths = [len(i.task.split()) for i in instructions]
    return {
        "instructions": len(instructions),
        "distinct_tasks": len({_normalize(i.task) for i in instructions}),
        "sources": dict(Counter(i.source for i in instructions)),
        "leading_words": dict(Counter(_normalize(i.task).split(" ")[0] for i in instructions).most_common(top)),
        "constraint_ids": dict(Counter(c.id for i in instructions for c in i.constraints).most_common()),
        "constraints_per_instruction": dict(sorted(Counter(len(i.constraints) for i in instructions).items())),
        "task_words": {"min": min(lengths, default=0), "max": max(lengths, default=0),
                       "mean": round(sum(lengths) / len(lengths), 2) if lengths else 0.0},
        "task_word_lengths": lengths,
    }


def self_instruct_examples(pool: list[str], shots: int, request_index: int, seed: int) -> list[str]:
    """The few-shot tasks of one self-instruct request: a seeded sample, different per request."""
    rng = random.Random(f"self-instruct:{seed}:{request_index}")
    return rng.sample(pool, min(shots, len(pool)))


def request_tasks(client: Any, model: str, examples: list[str], *, n: int, seed: int, max_tokens: int,
                  usage: Usage) -> list[str]:
    """New tasks from ``n`` completions of one self-instruct prompt (one request), junk filtered out."""
    resp = client.completions.create(
        model=model, prompt=self_instruct_prompt(examples), n=n, max_tokens=max_tokens, temperature=1.0,
        top_p=0.95, stop=["\n\n"], seed=seed,
    )
    usage.add(resp)
    return [t for c in sorted(resp.choices, key=lambda c: c.index) for t in parse_tasks(c.text)]
