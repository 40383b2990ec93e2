"""Training curves: ``metrics.jsonl`` (every log event) and PNG plots of loss, reward margins and accuracies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.atomic import atomic_write_text


def write_curves(log_history: list[dict[str, Any]], train_dir: Path) -> list[Path]:
    """metrics.jsonl (one line per log event) and PNG curves: loss, reward margins and accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write_text(train_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in log_history))
    written = [train_dir / "metrics.jsonl"]

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in log_history if key in r and "step" in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    panels = {
        "loss.png": [("loss", "train loss"), ("eval_loss", "eval loss")],
        "rewards.png": [("rewards/margins", "train margin"), ("eval_rewards/margins", "eval margin"),
                        ("rewards/accuracies", "train accuracy"), ("eval_rewards/accuracies", "eval accuracy")],
    }
    for name, keys in panels.items():
        if not any(key in r for r in log_history for key, _ in keys):
            continue  # e.g. no rewards in an SFT run
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in keys:
            xs, ys = series(key)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label)
        ax.set_xlabel("step")
        ax.set_title(name.removesuffix(".png"))
        ax.grid(alpha=0.3)
        ax.legend()
        tmp = train_dir / f".{name}.tmp"
        fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        tmp.replace(train_dir / name)
        written.append(train_dir / name)
    return written
