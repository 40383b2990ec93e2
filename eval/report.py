"""Eval reports: ``report.md`` + ``by_category.png`` for one eval, a round-over-round chart when the eval
dir sits in a run (``runs/<name>/round-<k>/eval``), and paired comparisons of two evals with a bootstrap
confidence interval so a reader can tell a gain from noise."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from shared.atomic import atomic_write_text

METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


def _round_history(out_dir: Path) -> list[tuple[int, dict[str, Any]]]:
    """Scores of every round's eval in the same run, when ``out_dir`` is ``.../round-<k>/eval``."""
    m = re.fullmatch(r"round-(\d+)", out_dir.parent.name)
    if not m or out_dir.name != "eval":
        return []
    hist = []
    for p in sorted(out_dir.parent.parent.glob("round-*/eval/scores.json")):
        k = int(p.parent.parent.name.split("-")[1])
        hist.append((k, json.loads(p.read_text())))
    return sorted(hist)


def _plot(out_dir: Path, scores: dict[str, Any], history: list[tuple[int, dict[str, Any]]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    cats = {k: v for k, v in scores["by_instruction"].items() if ":" not in k}
    if cats:
        names = sorted(cats)
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
        y = range(len(names))
        ax.barh([i + 0.2 for i in y], [cats[n]["strict"] for n in names], height=0.4, label="strict")
        ax.barh([i - 0.2 for i in y], [cats[n]["loose"] for n in names], height=0.4, label="loose")
        ax.set_yticks(list(y), [f"{n} (n={cats[n]['count']})" for n in names])
        ax.set_xlim(0, 1)
        ax.set_xlabel("instructions followed")
        ax.set_title(f"{scores.get('model', '')} on {scores.get('suite', '')}: by category")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out_dir / "by_category.png", dpi=110)
        plt.close(fig)
        made.append("by_category.png")
    if len(history) >= 2:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for m in METRICS:
            ax.plot([k for k, _ in history], [s[m] for _, s in history], marker="o", label=m)
        ax.set_xlabel("round")
        ax.set_ylabel("score")
        ax.set_ylim(0, 1)
        ax.set_xticks([k for k, _ in history])
        ax.legend(fontsize=8)
        ax.set_title("score by round")
        fig.tight_layout()
        fig.savefig(out_dir / "rounds.png", dpi=110)
        plt.close(fig)
        made.append("rounds.png")
    return made


def write_report(out_dir: str | Path, scores: dict[str, Any]) -> Path:
    out_dir = Path(out_dir)
    history = _round_history(out_dir)
    pngs = _plot(out_dir, scores, history)
    lines = [
        f"# Instruction-following eval: {scores.get('model', '?')}",
        "",
        f"Suite `{scores.get('suite')}`, {scores['n_prompts']} prompts, settings `{json.dumps(scores.get('settings', {}))}`; "
        f"{scores.get('truncated', 0)} responses hit max_tokens.",
        "",
        "| metric | score |",
        "|---|---|",
        *(f"| {m} | {scores[m]:.4f} |" for m in METRICS),
        "",
        "## By instruction",
        "",
        "| instruction | strict | loose | n |",
        "|---|---|---|---|",
        *(f"| {'**' + k + '**' if ':' not in k else k} | {v['strict']:.3f} | {v['loose']:.3f} | {v['count']} |"
          for k, v in scores["by_instruction"].items()),
        "",
    ]
    if len(history) >= 2:
        lines += ["## By round", "", "| round | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
        lines += [f"| {k} | " + " | ".join(f"{s[m]:.4f}" for m in METRICS) + " |" for k, s in history]
        lines.append("")
    lines += [f"![{p}]({p})" for p in pngs]
    return atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")


def _per_prompt(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in results}


def metric_parts(r: dict[str, Any], metric: str) -> tuple[float, int]:
    """(numerator, denominator) of one prompt's contribution to ``metric`` (from a results.jsonl row)."""
    if metric.startswith("prompt_"):
        return float(r[metric]), 1
    flags = r["follow_strict" if metric.endswith("strict") else "follow_loose"]
    return float(sum(flags)), len(flags)


def pooled(parts: list[tuple[float, int]]) -> float:
    """The metric over a set of prompts: instruction-level metrics pool instructions, not prompt means."""
    return sum(x for x, _ in parts) / max(1, sum(n for _, n in parts))


def compare(a_dir: str | Path, b_dir: str | Path, *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """B minus A on the prompts both scored, with a 95% paired bootstrap interval per metric."""
    def load(d: str | Path) -> dict[str, dict[str, Any]]:
        p = Path(d) / "results.jsonl"
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: run `python -m eval ... --out {d}` first")
        return _per_prompt([json.loads(x) for x in p.read_text().splitlines() if x.strip()])

    a, b = load(a_dir), load(b_dir)
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError(f"{a_dir} and {b_dir} share no prompts: compare evals of the same suite")
    rng = random.Random(seed)
    out: dict[str, Any] = {"n_paired": len(keys), "metrics": {}}
    for m in METRICS:
        pa = [metric_parts(a[k], m) for k in keys]
        pb = [metric_parts(b[k], m) for k in keys]
        delta = pooled(pb) - pooled(pa)
        boots = []
        for _ in range(n_boot):
            idx = [rng.randrange(len(keys)) for _ in keys]
            boots.append(pooled([pb[i] for i in idx]) - pooled([pa[i] for i in idx]))
        boots.sort()
        lo, hi = boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]
        out["metrics"][m] = {"a": pooled(pa), "b": pooled(pb), "delta": delta, "ci95": [lo, hi],
                             "significant": lo > 0 or hi < 0}
    return out


def format_compare(c: dict[str, Any], a: str, b: str) -> str:
    rows = [f"B = {b}\nA = {a}\n{c['n_paired']} paired prompts; 95% paired bootstrap interval of B - A", "",
            f"{'metric':<20}{'A':>8}{'B':>8}{'B-A':>9}   95% CI              "]
    for m, v in c["metrics"].items():
        flag = "  significant" if v["significant"] else "  (within noise)"
        rows.append(f"{m:<20}{v['a']:>8.4f}{v['b']:>8.4f}{v['delta']:>+9.4f}   "
                    f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]{flag}")
    return "\n".join(rows)
