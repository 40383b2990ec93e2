"""Eval reports: ``report.md`` + ``by_category.png`` + ``lengths.png`` for one eval, a round-over-round chart
when the eval dir sits in a run (``runs/<name>/round-<k>/eval``), and paired comparisons of two evals with a
bootstrap confidence interval so a reader can tell a gain from noise.

Beside the four IFEval metrics every eval reports a ``degeneration`` block (truncation, loops, distinct-n,
length, unrequested habits: :mod:`eval.degeneration`) and a ``heldout`` block (the score on the instruction
types pair building never draws, ``eval.heldout_types``): a higher IFEval score alone is no evidence of
teaching. Both are recomputed from ``results.jsonl`` (which keeps each response) by :func:`measures_of`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eval import degeneration as dg
from shared.atomic import atomic_write_text, parse_jsonl_lines
from shared.config import DEFAULT_HELDOUT_TYPES

METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")
# The same four, counting only answers that finished without looping or restating the prompt: a base model that
# loops passes "at least 20 sentences" or "the letter c at least 60 times" by accident. On gemma3-270m, 4.1 of its
# 13.3 points of prompt_loose came from looping or truncated answers, so a round that teaches it to stop loses them
# on the official metric even as its finished answers follow more instructions. An answer that restates the
# request passes format instructions the same way (its "<<title>>" and "P.S." are the prompt's): half of that
# model's remaining prompt-level passes did (eval.degeneration.is_echo).
CLEAN_METRICS = tuple(f"{m}_clean" for m in METRICS)
RATE_MEASURES = ("truncation_rate", "loop_rate", "echo_rate", *(f"{h}_rate" for h in dg.HABITS))
DEGENERATION_MEASURES = (*RATE_MEASURES, "words_median", "words_p90", "words_mean", "distinct_1", "distinct_2")


def _mean(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def heldout_scores(results: Sequence[dict[str, Any]], types: Sequence[str]) -> dict[str, Any]:
    """Instruction-level strict/loose accuracy over just the instructions of a held-out ``type`` (None when the
    suite asks none), and over all other instructions (``others``), from :func:`eval.ifeval.score_response`
    rows."""
    held = set(types)
    hs: list[bool] = []
    hl: list[bool] = []
    os_: list[bool] = []
    ol: list[bool] = []
    prompts = 0
    for r in results:
        hit = False
        for iid, st, lo in zip(r["instruction_id_list"], r["follow_strict"], r["follow_loose"], strict=True):
            if iid in held:
                hs.append(st)
                hl.append(lo)
                hit = True
            else:
                os_.append(st)
                ol.append(lo)
        prompts += hit
    return {"types": list(types), "n_instructions": len(hs), "n_prompts": prompts, "strict": _mean(hs),
            "loose": _mean(hl), "others": {"n_instructions": len(os_), "strict": _mean(os_), "loose": _mean(ol)}}


def degenerate(r: dict[str, Any]) -> bool:
    """Whether a results row's answer is degenerate: it hit max_tokens, loops (:func:`eval.degeneration.is_looping`)
    or restates its prompt (:func:`eval.degeneration.is_echo`, recorded since 2026-12-02). Rows scored before
    ``degenerate`` was recorded are judged from their finish reason and response."""
    if "degenerate" in r:
        return bool(r["degenerate"])
    return r.get("finish_reason") == "length" or dg.is_looping(r.get("response") or "")


def clean_scores(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """:data:`CLEAN_METRICS`: the four IFEval metrics with a degenerate answer's instructions counted as not
    followed."""
    return {m: pooled([metric_parts(r, m) for r in results]) for m in CLEAN_METRICS}


def _profiles(results: Sequence[dict[str, Any]], long_words: int) -> list[dict[str, Any]] | None:
    if not results or any(not isinstance(r.get("response"), str) for r in results):
        return None
    return [{**dg.profile(r["response"], r["instruction_id_list"], r.get("finish_reason"), long_words=long_words),
             "echo": r.get("echo"), "fewshot": r.get("fewshot")} for r in results]


def degeneration_of(results: Sequence[dict[str, Any]], long_words: int = dg.DEFAULT_LONG_WORDS
                    ) -> dict[str, Any] | None:
    """The degeneration block of results rows that carry ``response`` (None for rows without it: old evals)."""
    profs = _profiles(results, long_words)
    if profs is None:
        return None
    return dg.summarize([r["response"] for r in results], profs, long_words=long_words)


def read_results(eval_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(eval_dir) / "results.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def _recorded_settings(scores: dict[str, Any]) -> tuple[list[str], int]:
    """(held-out types, long-answer words) an eval was scored with (scores.json), else the defaults."""
    held, deg = scores.get("heldout"), scores.get("degeneration")
    return (list(held["types"]) if held else list(DEFAULT_HELDOUT_TYPES),
            deg["long_words"] if deg else dg.DEFAULT_LONG_WORDS)


def measures_of(eval_dir: str | Path, *, heldout_types: Sequence[str] | None = None,
                long_words: int | None = None) -> dict[str, Any]:
    """``{"degeneration": ..., "heldout": ...}`` of one eval dir, recomputed from its results.jsonl with these
    settings (default: those its scores.json recorded, else the defaults), so rounds evaluated under other
    settings compare on equal terms. A block that cannot be computed (no results, or results without response
    text) comes from scores.json, else is None."""
    d = Path(eval_dir)
    scores = json.loads((d / "scores.json").read_text()) if (d / "scores.json").exists() else {}
    rec_deg, rec_held = scores.get("degeneration"), scores.get("heldout")
    rec_types, rec_long = _recorded_settings(scores)
    heldout_types = rec_types if heldout_types is None else heldout_types
    long_words = rec_long if long_words is None else long_words
    rows = read_results(d)
    deg = degeneration_of(rows, long_words) if rows else None
    if deg is None and rec_deg and rec_deg.get("long_words") == long_words:
        deg = rec_deg
    held = heldout_scores(rows, heldout_types) if rows else None
    if held is None and rec_held and sorted(rec_held["types"]) == sorted(heldout_types):
        held = rec_held
    return {"degeneration": deg, "heldout": held}


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


def _plot(out_dir: Path, scores: dict[str, Any], history: list[tuple[int, dict[str, Any]]],
          lengths: list[int] | None = None) -> list[str]:
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
    if lengths:
        deg = scores.get("degeneration") or {}
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(lengths, bins=min(40, max(5, len(set(lengths)))), color="tab:blue", alpha=0.8)
        for name, q, style in (("median", "words_median", "-"), ("p90", "words_p90", "--")):
            if q in deg:
                ax.axvline(deg[q], color="k", ls=style, lw=1, label=f"{name} {deg[q]:.0f}")
        if "long_words" in deg:
            ax.axvline(deg["long_words"], color="tab:red", ls=":", lw=1, label=f"long ({deg['long_words']})")
        ax.set_xlabel("response length (words)")
        ax.set_ylabel("responses")
        ax.legend(fontsize=8)
        ax.set_title(f"{scores.get('model', '')}: response lengths")
        fig.tight_layout()
        fig.savefig(out_dir / "lengths.png", dpi=110)
        plt.close(fig)
        made.append("lengths.png")
    if len(history) >= 2:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for m in METRICS:
            ax.plot([k for k, _ in history], [s[m] for _, s in history], marker="o", label=m)
        held = [(k, s["heldout"]["loose"]) for k, s in history if (s.get("heldout") or {}).get("loose") is not None]
        if held:
            ax.plot([k for k, _ in held], [v for _, v in held], marker="s", ls="--", color="k",
                    label="held-out types (inst. loose)")
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


def _f(v: Any, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def degeneration_lines(deg: dict[str, Any] | None) -> list[str]:
    """Markdown for one eval's degeneration block."""
    if not deg:
        return ["No degeneration measures: this eval's results carry no response text (re-run the eval).", ""]
    lines = [f"Over {deg['n_responses']} responses. Habits count only answers to prompts that did not ask for "
             "them; a habit that rises across rounds is learned, not taught.", "",
             "| measure | value |", "|---|---|",
             f"| truncated (finish_reason = length) | {deg['truncation_rate']:.3f} |",
             f"| looping | {deg['loop_rate']:.3f} |",
             f"| distinct-1 / distinct-2 | {deg['distinct_1']:.3f} / {deg['distinct_2']:.3f} |",
             f"| words: median / p90 / mean / max | {deg['words_median']:.0f} / {deg['words_p90']:.0f} / "
             f"{deg['words_mean']:.1f} / {deg['words_max']} |", "",
             "| unrequested habit | rate | over answers | counted |", "|---|---|---|---|"]
    for h, what in dg.HABITS.items():
        v = deg["habits"][h]
        what = what.replace("past the length limit (words)", f"over {deg['long_words']} words")
        lines.append(f"| {h} | {_f(v['rate'])} | {v['n']} | {what} |")
    return lines + [""]


def heldout_lines(held: dict[str, Any] | None) -> list[str]:
    """Markdown for one eval's held-out-types block."""
    if not held or not held["types"]:
        return ["No held-out instruction types configured.", ""]
    if not held["n_instructions"]:
        return [f"The suite asks none of the held-out types ({', '.join(held['types'])}): no held-out score.", ""]
    o = held["others"]
    return [f"Instruction types pair building never draws: {', '.join(f'`{t}`' for t in held['types'])}.", "",
            "| instructions | strict | loose | n |", "|---|---|---|---|",
            f"| held-out types | {_f(held['strict'], '.4f')} | {_f(held['loose'], '.4f')} | {held['n_instructions']} "
            f"({held['n_prompts']} prompts) |",
            f"| all others | {_f(o['strict'], '.4f')} | {_f(o['loose'], '.4f')} | {o['n_instructions']} |", ""]


def write_report(out_dir: str | Path, scores: dict[str, Any]) -> Path:
    out_dir = Path(out_dir)
    history = _round_history(out_dir)
    rows = read_results(out_dir)
    lengths = [len(dg.words(r["response"])) for r in rows if isinstance(r.get("response"), str)]
    pngs = _plot(out_dir, scores, history, lengths or None)
    held_types = set((scores.get("heldout") or {}).get("types", ()))
    lines = [
        f"# Instruction-following eval: {scores.get('model', '?')}",
        "",
        f"Suite `{scores.get('suite')}`, {scores['n_prompts']} prompts, settings `{json.dumps(scores.get('settings', {}))}`; "
        f"{scores.get('truncated', 0)} responses hit max_tokens.",
        "",
        "| metric | score | clean (answers that finished without looping or echoing the prompt) |",
        "|---|---|---|",
        *(f"| {m} | {scores[m]:.4f} | {_f(scores.get(m + '_clean'), '.4f')} |" for m in METRICS),
        "",
        "## Degeneration",
        "",
        *degeneration_lines(scores.get("degeneration")),
        "## Held-out instruction types",
        "",
        *heldout_lines(scores.get("heldout")),
        "## By instruction",
        "",
        "| instruction | strict | loose | n |",
        "|---|---|---|---|",
        *(f"| {'**' + k + '**' if ':' not in k else k}{' (held out)' if k in held_types else ''} | "
          f"{v['strict']:.3f} | {v['loose']:.3f} | {v['count']} |" for k, v in scores["by_instruction"].items()),
        "",
    ]
    if len(history) >= 2:
        lines += ["## By round", "", "| round | " + " | ".join(METRICS) + " | held-out loose |",
                  "|---" * (len(METRICS) + 2) + "|"]
        lines += [f"| {k} | " + " | ".join(f"{s[m]:.4f}" for m in METRICS)
                  + f" | {_f((s.get('heldout') or {}).get('loose'), '.4f')} |" for k, s in history]
        lines.append("")
        deg_hist = [(k, dg.flat(s["degeneration"])) for k, s in history if s.get("degeneration")]
        if deg_hist:
            cols = ("truncation_rate", "loop_rate", "words_median", *(f"{h}_rate" for h in dg.HABITS))
            lines += ["| round | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {k} | " + " | ".join(_f(f[c], ".0f" if c == "words_median" else ".3f") for c in cols) + " |"
                      for k, f in deg_hist]
            lines.append("")
    lines += [f"![{p}]({p})" for p in pngs]
    return atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")


def _per_prompt(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in results}


def metric_parts(r: dict[str, Any], metric: str) -> tuple[float, int]:
    """(numerator, denominator) of one prompt's contribution to ``metric`` (from a results.jsonl row)."""
    if metric.endswith("_clean"):
        num, den = metric_parts(r, metric.removesuffix("_clean"))
        return (0.0 if degenerate(r) else num), den
    if metric.startswith("prompt_"):
        return float(r[metric]), 1
    flags = r["follow_strict" if metric.endswith("strict") else "follow_loose"]
    return float(sum(flags)), len(flags)


def pooled(parts: list[tuple[float, int]]) -> float:
    """The metric over a set of prompts: instruction-level metrics pool instructions, not prompt means."""
    return sum(x for x, _ in parts) / max(1, sum(n for _, n in parts))


def heldout_parts(r: dict[str, Any], types: set[str], loose: bool) -> tuple[float, int]:
    """(followed, asked) over one prompt's instructions of a held-out type."""
    flags = [f for iid, f in zip(r["instruction_id_list"], r["follow_loose" if loose else "follow_strict"],
                                 strict=True) if iid in types]
    return float(sum(flags)), len(flags)


def _rate_parts(profile: dict[str, Any], measure: str) -> tuple[float, int]:
    key = {"truncation_rate": "truncated", "loop_rate": "looping"}.get(measure, measure.removesuffix("_rate"))
    v = profile[key]
    return (0.0, 0) if v is None else (float(v), 1)


def _interval(deltas: Any, n_boot: int) -> list[float] | None:
    import numpy as np

    d = np.sort(deltas[~np.isnan(deltas)])
    if not len(d):
        return None
    return [float(d[int(0.025 * len(d))]), float(d[max(0, int(0.975 * len(d)) - 1)])]


def _paired(pa: list[tuple[float, int]], pb: list[tuple[float, int]], w: Any) -> dict[str, Any]:
    """Pooled A, B, B - A and a percentile bootstrap interval of B - A; ``w`` (boots x prompts) counts how often
    each prompt is in each resample (:func:`_resample_weights`)."""
    import numpy as np

    a_num, a_den = (np.array(x, dtype=float) for x in zip(*pa))
    b_num, b_den = (np.array(x, dtype=float) for x in zip(*pb))
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = (w @ b_num) / (w @ b_den) - (w @ a_num) / (w @ a_den)
    a = pooled(pa) if a_den.sum() else None
    b = pooled(pb) if b_den.sum() else None
    ci = _interval(boots, len(w)) if a is not None and b is not None else None
    return {"a": a, "b": b, "delta": b - a if a is not None and b is not None else None, "ci95": ci,
            "significant": bool(ci and (ci[0] > 0 or ci[1] < 0)), "n_a": int(a_den.sum()), "n_b": int(b_den.sum())}


def _resample_weights(groups: Sequence[str] | None, n: int, n_boot: int, seed: int) -> Any:
    """(boots x n) counts of each prompt in each bootstrap resample. Without ``groups``, prompts are resampled
    one by one; with them (one label per prompt), whole groups are: the variants of one seed task share the task,
    so their verdicts are not independent, and a prompt-level interval would be too narrow."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, n, size=(n_boot, n))
        return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)
    labels = sorted(set(groups))
    of = np.array([labels.index(g) for g in groups])
    draws = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    counts = np.stack([np.bincount(row, minlength=len(labels)) for row in draws])
    return counts[:, of].astype(float)


def compare(a_dir: str | Path, b_dir: str | Path, *, n_boot: int = 2000, seed: int = 0,
            heldout_types: Sequence[str] | None = None, long_words: int | None = None) -> dict[str, Any]:
    """B minus A on the prompts both scored, with a 95% paired bootstrap interval per metric: the four IFEval
    metrics, the held-out types' instruction-level scores and (when both evals kept their responses) the
    degeneration measures. ``heldout_types`` / ``long_words`` default to what A's scores.json recorded."""
    import numpy as np

    def load(d: str | Path) -> dict[str, dict[str, Any]]:
        p = Path(d) / "results.jsonl"
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: run `python -m eval ... --out {d}` first")
        rows, problems = parse_jsonl_lines(p.read_text(encoding="utf-8", errors="replace"))
        if problems:
            raise ValueError(f"{p}: {len(problems)} bad line(s), e.g. {problems[0]}: not an eval's results "
                             f"file; rerun `python -m eval ... --out {d}`")
        need = ("key", "prompt_strict", "prompt_loose", "follow_strict", "follow_loose")
        bad = next((n for n, r in rows if not isinstance(r, dict) or any(k not in r for k in need)), None)
        if bad is not None:
            raise ValueError(f"{p}: line {bad} lacks the eval result fields {list(need)}: not an eval's results "
                             f"file; rerun `python -m eval ... --out {d}`")
        return _per_prompt([r for _, r in rows])

    a, b = load(a_dir), load(b_dir)
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError(f"{a_dir} and {b_dir} share no prompts: compare evals of the same suite")
    a_scores = Path(a_dir) / "scores.json"
    try:
        recorded = json.loads(a_scores.read_text()) if a_scores.exists() else {}
    except ValueError:
        raise ValueError(f"{a_scores} is not valid JSON: rerun `python -m eval ... --out {a_dir}`") from None
    rec_types, rec_long = _recorded_settings(recorded)
    heldout_types = rec_types if heldout_types is None else heldout_types
    long_words = rec_long if long_words is None else long_words
    ra, rb = [a[k] for k in keys], [b[k] for k in keys]
    tasks = [r.get("task_id") for r in ra]  # the own suite's items name their seed task; IFEval's do not
    groups = tasks if all(tasks) and len(set(tasks)) < len(tasks) else None
    idx = _resample_weights(groups, len(keys), n_boot, seed)
    out: dict[str, Any] = {"n_paired": len(keys), "metrics": {},
                           "resampled": "prompt" if groups is None else "seed task",
                           "n_groups": len(keys) if groups is None else len(set(groups))}
    for m in (*METRICS, *CLEAN_METRICS):
        out["metrics"][m] = _paired([metric_parts(r, m) for r in ra], [metric_parts(r, m) for r in rb], idx)
    held = set(heldout_types)
    out["heldout"] = {"types": list(heldout_types), **{
        lvl: _paired([heldout_parts(r, held, lvl == "loose") for r in ra],
                     [heldout_parts(r, held, lvl == "loose") for r in rb], idx) for lvl in ("strict", "loose")}}
    prof_a, prof_b = _profiles(ra, long_words), _profiles(rb, long_words)
    if prof_a is None or prof_b is None:
        out["degeneration"] = None
        return out
    deg: dict[str, Any] = {m: _paired([_rate_parts(p, m) for p in prof_a], [_rate_parts(p, m) for p in prof_b], idx)
                           for m in RATE_MEASURES}
    wa = np.array([p["words"] for p in prof_a], dtype=float)
    wb = np.array([p["words"] for p in prof_b], dtype=float)
    ma, mb = float(np.median(wa)), float(np.median(wb))
    reps = [np.repeat(np.arange(len(wa)), row.astype(int)) for row in idx]
    ci = _interval(np.array([np.median(wb[r]) - np.median(wa[r]) for r in reps]), n_boot)
    deg["words_median"] = {"a": ma, "b": mb, "delta": mb - ma, "ci95": ci,
                           "significant": bool(ci and (ci[0] > 0 or ci[1] < 0)), "n_a": len(wa), "n_b": len(wb)}
    for n in (1, 2):  # a property of the whole set: no per-prompt bootstrap
        da, db = dg.distinct_n([r["response"] for r in ra], n), dg.distinct_n([r["response"] for r in rb], n)
        deg[f"distinct_{n}"] = {"a": da, "b": db, "delta": db - da, "ci95": None, "significant": False,
                                "n_a": len(ra), "n_b": len(rb)}
    out["degeneration"] = deg
    out["long_words"] = long_words
    return out


def _row(name: str, v: dict[str, Any], fmt: str = ".4f") -> str:
    if v["a"] is None or v["b"] is None:
        return f"{name:<20}{_f(v['a'], fmt):>8}{_f(v['b'], fmt):>8}{'':>9}   (not measured in both)"
    ci = f"[{v['ci95'][0]:+{fmt}}, {v['ci95'][1]:+{fmt}}]" if v["ci95"] else ""
    flag = ("  significant" if v["significant"] else "  (within noise)") if v["ci95"] else ""
    return f"{name:<20}{v['a']:>8{fmt}}{v['b']:>8{fmt}}{v['delta']:>+9{fmt}}   {ci:<20}{flag}"


def format_compare(c: dict[str, Any], a: str, b: str) -> str:
    by = ("" if c.get("resampled", "prompt") == "prompt"
          else f", resampled by {c['resampled']} ({c['n_groups']} groups: variants of one task are not independent)")
    rows = [f"B = {b}\nA = {a}\n{c['n_paired']} paired prompts; 95% paired bootstrap interval of B - A{by}", "",
            f"{'metric':<20}{'A':>8}{'B':>8}{'B-A':>9}   95% CI              "]
    rows += [_row(m, v) for m, v in c["metrics"].items()]
    held = c.get("heldout")
    if held:
        n = held["loose"]["n_a"]
        rows += ["", f"held-out instruction types ({n} instructions in A): {', '.join(held['types'])}"]
        rows += [_row(f"heldout_{lvl}", held[lvl]) for lvl in ("strict", "loose")]
    deg = c.get("degeneration")
    rows.append("")
    if deg is None:
        rows.append("degeneration: not measured (an eval's results.jsonl has no response text; re-run it)")
    else:
        rows.append(f"degeneration (habits over prompts that did not ask for them; long = over {c['long_words']} "
                    f"words)")
        for m, v in deg.items():
            rows.append(_row(m, v, ".1f" if m == "words_median" else ".4f")
                        + (f"  n={v['n_a']}/{v['n_b']}" if m.endswith("_rate") and m[:-5] in dg.HABITS else ""))
    return "\n".join(rows)
