"""Cost ledger: wall time x $/hr and token counts per stage, appended as JSONL to the round's ledger.

    ledger = CostLedger(rd.ledger, usd_per_hour=1.74)
    with ledger.stage("pairs") as st:
        ...
        st.add(prompt_tokens=1200, completion_tokens=800, accepted_pairs=10)
    ledger.total_usd()

A stage that raises is still recorded (status "error"), so a crashed run's spend is not lost.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shared.atomic import append_jsonl, read_jsonl


@dataclass
class StageRecord:
    stage: str
    usd_per_hour: float
    meta: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    started: float = field(default_factory=time.time)

    def add(self, **counts: float) -> None:
        """Add to counters such as prompt_tokens, completion_tokens, accepted_pairs."""
        for k, v in counts.items():
            self.counters[k] += v

    @property
    def elapsed_s(self) -> float:
        return time.time() - self.started

    @property
    def cost_so_far(self) -> float:
        return self.elapsed_s / 3600.0 * self.usd_per_hour


class CostLedger:
    def __init__(self, path: str | os.PathLike[str], usd_per_hour: float = 0.0) -> None:
        self.path = Path(path)
        self.usd_per_hour = usd_per_hour

    @contextlib.contextmanager
    def stage(self, name: str, **meta: Any) -> Iterator[StageRecord]:
        rec = StageRecord(stage=name, usd_per_hour=self.usd_per_hour, meta=dict(meta))
        status = "ok"
        try:
            yield rec
        except BaseException:
            status = "error"
            raise
        finally:
            ended = time.time()
            wall = ended - rec.started
            append_jsonl(
                self.path,
                {
                    "stage": name,
                    "status": status,
                    "started_at": datetime.fromtimestamp(rec.started, timezone.utc).isoformat(),
                    "ended_at": datetime.fromtimestamp(ended, timezone.utc).isoformat(),
                    "wall_s": round(wall, 3),
                    "usd_per_hour": self.usd_per_hour,
                    "cost_usd": round(wall / 3600.0 * self.usd_per_hour, 6),
                    **{k: (int(v) if float(v).is_integer() else v) for k, v in rec.counters.items()},
                    **rec.meta,
                },
            )

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def totals(self) -> dict[str, dict[str, float]]:
        """Per stage: summed wall_s, cost_usd and every numeric counter."""
        out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        skip = {"usd_per_hour"}
        for r in self.records():
            for k, v in r.items():
                if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[r["stage"]][k] += v
        return {s: dict(v) for s, v in out.items()}

    def total_usd(self) -> float:
        return sum(r.get("cost_usd", 0.0) for r in self.records())
