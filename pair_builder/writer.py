"""The driver's writer: parquet shards, the ``done`` log and the manifest of ``round-K/pairs/`` - exactly once.

Bookkeeping and reports live in the hidden ``pairs/.meta/`` (``datasets.load_dataset("parquet",
data_dir=pairs)`` reads every non-hidden file as parquet, so nothing else may sit beside the shards):

* ``.meta/manifest.json`` pins what the directory holds (model revision, constitution and template hashes,
  sampling settings); a run whose manifest differs is refused, so pairs of two models never mix.
* kept pairs are buffered and written as ``shard-NNNNN.parquet`` (pyarrow into memory, then an atomic
  temp-file + rename), and only then are their ids appended to ``.meta/done.jsonl``; dropped items are
  appended at once. A crash between the two leaves pairs whose ids are not yet done: on restart they are
  read back from the shards, so the redone item's pair is recognised and not written again.
* pair ids are content hashes, so "done" and "already written" survive any resubmission.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared.atomic import append_jsonl_many, atomic_write_bytes, atomic_write_json, read_jsonl
from shared.records import PAIR_COLUMNS, REF_LOGP_COLUMNS

log = logging.getLogger(__name__)

META_DIR = ".meta"
MANIFEST_KEYS = ("model_revision", "constitution_sha256", "template_sha256", "sampling", "round")
SCHEMA_FIELDS = [
    ("id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
    ("instruction_id", pa.string()), ("constraints", pa.string()), ("principle_id", pa.string()),
    ("chosen_passed", pa.int64()), ("rejected_passed", pa.int64()), ("model", pa.string()), ("round", pa.int64()),
]
assert tuple(n for n, _ in SCHEMA_FIELDS) == PAIR_COLUMNS  # kept in step with shared/records.py


class OutputMismatch(RuntimeError):
    """The pairs dir already holds pairs made under other settings."""


def pair_schema(ref_logprobs: bool) -> pa.Schema:
    extra = [(n, pa.float64()) for n in REF_LOGP_COLUMNS] if ref_logprobs else []
    return pa.schema(SCHEMA_FIELDS + extra)


class PairWriter:
    def __init__(self, out_dir: str | os.PathLike[str], manifest: dict[str, Any], *, shard_size: int = 256,
                 ref_logprobs: bool = True) -> None:
        self.dir = Path(out_dir)
        self.meta = self.dir / META_DIR
        self.shard_size = shard_size
        self.schema = pair_schema(ref_logprobs)
        self._check_manifest(manifest)
        self.written_ids: set[str] = set()
        for shard in self.shards():
            self.written_ids.update(pq.read_table(shard, columns=["id"]).column("id").to_pylist())
        self.done: dict[str, dict[str, Any]] = {r["id"]: r for r in read_jsonl(self.done_path)}
        self._kept = sum(1 for r in self.done.values() if r.get("kept"))  # kept_count is polled per dispatch
        self._buffer: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (record, done entry)

    @property
    def done_path(self) -> Path:
        return self.meta / "done.jsonl"

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.parquet"))

    def _check_manifest(self, manifest: dict[str, Any]) -> None:
        path = self.meta / "manifest.json"
        want = {k: manifest[k] for k in MANIFEST_KEYS}
        if path.exists():
            have = json.loads(path.read_text())
            diff = [k for k in MANIFEST_KEYS if have.get(k) != want[k]]
            if diff:
                raise OutputMismatch(
                    f"{self.dir} holds pairs made with a different {', '.join(diff)} "
                    f"(e.g. {diff[0]}: {have.get(diff[0])!r} there, {want[diff[0]]!r} now). Refusing to mix them: "
                    f"use another run.name / pairs.round, or move that directory away."
                )
        elif any(self.dir.glob("shard-*.parquet")):
            raise OutputMismatch(f"{self.dir} holds pair shards but no manifest.json; move them away first")
        else:
            atomic_write_json(path, manifest)

    def records(self) -> dict[str, dict[str, Any]]:
        """Every written checker pair, by id (flush first)."""
        out: dict[str, dict[str, Any]] = {}
        for shard in self.shards():
            for row in pq.read_table(shard).to_pylist():
                out[row["id"]] = row
        return out

    def is_done(self, item_id: str) -> bool:
        return item_id in self.done

    @property
    def kept_count(self) -> int:
        return self._kept + len(self._buffer)

    def add(self, result: dict[str, Any]) -> None:
        """Record one finished item (kept or dropped); failed items (``error``) are not done and not written."""
        if result.get("error"):
            return
        iid = result["id"]
        if iid in self.done or any(e["id"] == iid for _, e in self._buffer):
            return  # a retried task finished twice
        entry = {k: v for k, v in result.items() if k not in ("record", "candidates")}
        if result.get("candidates") is not None:  # pairs.record_candidates: for audits and labelling
            append_jsonl_many(self.meta / "candidates.jsonl", [{"id": iid, **result["candidates"]}])
        if not result["kept"]:
            self._mark_done(entry)
            return
        if iid in self.written_ids:  # written before a crash, done entry lost: don't write it again
            self._mark_done(entry)
            return
        self._buffer.append((result["record"], entry))
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def _mark_done(self, *entries: dict[str, Any]) -> None:
        append_jsonl_many(self.done_path, list(entries))  # one fsync for a whole shard's entries
        for entry in entries:
            if entry.get("kept") and entry["id"] not in self.done:
                self._kept += 1
            self.done[entry["id"]] = entry

    def flush(self) -> Path | None:
        """Write buffered pairs as one shard atomically, then mark their items done."""
        if not self._buffer:
            return None
        rows = [rec for rec, _ in self._buffer]
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in self.schema} for r in rows], schema=self.schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        n = len(self.shards())
        path = self.dir / f"shard-{n:05d}.parquet"
        while path.exists():  # never overwrite a shard
            n += 1
            path = self.dir / f"shard-{n:05d}.parquet"
        atomic_write_bytes(path, buf.getvalue())
        self.written_ids.update(r["id"] for r in rows)
        self._mark_done(*(entry for _, entry in self._buffer))
        log.info("wrote %s (%d pairs)", path.name, len(rows))
        self._buffer.clear()
        return path
