"""Where the trainer reads and writes for a config: explicit settings win, else the run dir's round layout.

Round k trains on ``round-k/pairs`` and writes ``round-k/adapter``; checkpoints, tensorboard logs, metrics and
plots go to ``round-k/train``; the merge writes ``round-k/merged``, which round k+1 serves.

What round k trains depends on ``train.continue_adapter``:

* on (the default): every round trains ONE cumulative adapter over the original base (``model.base``). Round k>0
  starts from round k-1's adapter, and a frozen copy of it is the DPO reference - the policy round k-1 produced,
  the same model the server scored the pairs' reference log-probs on (its 16-bit merge). The update stays an
  adapter: it is never re-quantized into a merge (measured on gemma3-270m in bf16, 0.90 of a round's movement
  carried vs 0.76 for the merge loaded again; in NF4 neither carries it well at that size: bench/round_carry.py).
* off: round k>0 trains a fresh LoRA on round k-1's merge (``round-(k-1)/merged``).
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
    init_adapter: Path | None = None  # the adapter this round continues (and its reference), or None: a fresh LoRA


def _original_base(cfg: Any) -> Path:
    spec = cfg.train.base_model or cfg.model.base
    if Path(spec).is_dir():
        return Path(spec)
    from gen_server.models import resolve_model  # packaged model names, e.g. smollm2-135m

    return Path(resolve_model(spec))


def resolve_base_model(cfg: Any) -> Path:
    """The 16-bit model round ``cfg.train.round`` trains on (a packaged name is prepared on first use)."""
    k = cfg.train.round
    if cfg.train.base_model or k == 0 or cfg.train.continue_adapter:
        return _original_base(cfg)
    prev = RunDir.from_config(cfg).round(k - 1, create=False).merged
    if not prev.is_dir():
        raise FileNotFoundError(
            f"round {k} starts from {prev}, which does not exist; run `python -m trainer.merge --config CFG "
            f"train.round={k - 1}` first or set train.base_model=DIR"
        )
    return prev


def resolve_init_adapter(cfg: Any) -> Path | None:
    """Round k-1's adapter when round k continues it (``train.continue_adapter``), else None."""
    k = cfg.train.round
    if k == 0 or not cfg.train.continue_adapter:
        return None
    prev = RunDir.from_config(cfg).round(k - 1, create=False).adapter
    if not (prev / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"round {k} continues round {k - 1}'s adapter, but {prev} holds none; run `python -m "
            f"trainer.{cfg.train.method} --config CFG train.round={k - 1}` first, or set "
            f"train.continue_adapter=false to train a fresh LoRA on round {k - 1}'s merge"
        )
    return prev


def resolve_train_paths(cfg: Any) -> TrainPaths:
    rd = RunDir.from_config(cfg).round(cfg.train.round, create=False)
    adapter = Path(cfg.train.output_dir) if cfg.train.output_dir else rd.adapter
    return TrainPaths(
        round_dir=rd,
        base_model=resolve_base_model(cfg),
        pairs_dir=Path(cfg.train.pairs_dir) if cfg.train.pairs_dir else rd.pairs,
        adapter_dir=adapter,
        train_dir=adapter.parent / "train",
        init_adapter=resolve_init_adapter(cfg),
    )
