"""What a run has finished, in ``RUN/state.json`` (written atomically after every step).

A step is recorded only after it succeeded, so ``pipeline run`` after a crash redoes at most the step that
was running - and each step resumes on its own (eval's response cache, pair_builder's done log, the
trainer's checkpoints), so even that step's finished work is kept.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from shared.atomic import atomic_write_json


class RunState:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "state.json"
        self.data: dict[str, Any] = (
            json.loads(self.path.read_text()) if self.path.exists() else {"steps": {}, "stopped": None}
        )

    def done(self, step: str) -> bool:
        return step in self.data["steps"]

    def info(self, step: str) -> dict[str, Any]:
        return self.data["steps"].get(step, {})

    def mark(self, step: str, **info: Any) -> None:
        self.data["steps"][step] = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        atomic_write_json(self.path, self.data)

    def stop(self, reason: str, *, round: int, promoted: str | None) -> None:
        self.data["stopped"] = {"reason": reason, "round": round, "promoted_model": promoted,
                                "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(self.path, self.data)

    @property
    def stopped(self) -> dict[str, Any] | None:
        return self.data.get("stopped")
