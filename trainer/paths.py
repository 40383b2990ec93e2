"""Where the trainer reads and writes for a config: explicit settings win, else the run dir's round layout.

Round k trains the model that round k-1 merged (round 0: ``model.base``) on ``round-k/pairs`` and writes
``round-k/adapter``; checkpoints, tensorboard logs, metrics and plots go to ``round-k/train``; the merge
writes ``round-k/merged``, which is round k+1's base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.rundir import RoundDir, RunDir


@dataclass(frozen=True)
class TrainPaths:
    round_dir: RoundDir
    base_model: Path
    pairs_dir: Path
    adapter_dir: Path
    train_dir: Path  # checkpoints, tensorboard, metrics.jsonl, plots


def resolve_base_model(cfg: Any) -> Path:
    """The 16-bit model round ``cfg.train.round`` starts from (a packaged name is prepared on first use)."""
    k = cfg.train.round
    if cfg.train.base_model:
        spec = cfg.train.base_model
    elif k == 0:
        spec = cfg.model.base
    else:
        prev = RunDir.from_config(cfg).round(k - 1, create=False).merged
        if not prev.is_dir():
            raise FileNotFoundError(
                f"round {k} starts from {prev}, which does not exist; run `python -m trainer.merge --config CFG "
                f"train.round={k - 1}` first or set train.base_model=DIR"
            )
        return prev
    if Path(spec).is_dir():
        return Path(spec)
    from gen_server.models import resolve_model  # packaged demo model names, e.g. smollm2-135m

    return Path(resolve_model(spec))


def resolve_train_paths(cfg: Any) -> TrainPaths:
    rd = RunDir.from_config(cfg).round(cfg.train.round, create=False)
    adapter = Path(cfg.train.output_dir) if cfg.train.output_dir else rd.adapter
    return TrainPaths(
        round_dir=rd,
        base_model=resolve_base_model(cfg),
        pairs_dir=Path(cfg.train.pairs_dir) if cfg.train.pairs_dir else rd.pairs,
        adapter_dir=adapter,
        train_dir=adapter.parent / "train",
    )
