"""Run directory layout (the contract every stage shares): ``<root>/<name>/round-<k>/{pairs,adapter,merged,eval}``,
``round-<k>/ledger.jsonl`` and the resolved ``config.yaml`` at the run's top."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from shared.config import save_config

_ROUND = re.compile(r"^round-(\d+)$")


@dataclass(frozen=True)
class RoundDir:
    path: Path
    k: int

    @property
    def pairs(self) -> Path:
        return self.path / "pairs"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    @property
    def ledger(self) -> Path:
        return self.path / "ledger.jsonl"


class RunDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def from_config(cls, cfg: BaseModel) -> RunDir:
        run = cfg.run  # type: ignore[attr-defined]
        return cls(Path(run.root) / run.name)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def round(self, k: int, *, create: bool = True) -> RoundDir:
        if k < 0:
            raise ValueError(f"round must be >= 0, got {k}")
        rd = RoundDir(self.path / f"round-{k}", k)
        if create:
            rd.path.mkdir(parents=True, exist_ok=True)
        return rd

    def rounds(self) -> list[int]:
        if not self.path.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.path.iterdir() if p.is_dir() and (m := _ROUND.match(p.name)))

    def spent_usd(self) -> float:
        """Dollars every round's ledger of this run records: what ``cost.budget_usd`` is checked against, by
        pair building, training and the pipeline alike."""
        from shared.ledger import CostLedger

        return sum(CostLedger(self.round(k, create=False).ledger).total_usd() for k in self.rounds())

    def save_config(self, cfg: BaseModel) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return save_config(cfg, self.config_path)
