"""What a training run leaves behind and how it ends: the adapter's summary file, the base's fingerprint (a merge
into another base is refused), the run's result and its failures (each with its exit code in ``trainer.recipe.cli``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUMMARY_NAME = "train_summary.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class RefLogpsMismatch(ValueError):
    """The dataset's reference log-probs disagree with the trainer's own reference model."""


@dataclass
class TrainResult:
    status: str  # completed | early_stopped | budget | diverged
    adapter_dir: Path | None
    train_dir: Path
    global_step: int
    metrics: dict[str, float]


def base_fingerprint(base_model: Path) -> dict[str, Any]:
    """The base's shape, recorded with the adapter so a merge into another base is refused."""
    c = json.loads((base_model / "config.json").read_text())
    text = c.get("text_config", c)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")
    return {k: text.get(k) for k in keys}
