"""Stats, PNG histograms and the dataset card of a pairs dir, computed from the ``done`` log.

The done log holds one entry per finished item across every run into the directory, so the numbers
are exact after any number of resubmissions: kept + every drop reason = items done.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path
from statistics import mean
from typing import Any

from pair_builder.extras import balance_table
from shared.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def _frac(passed: list[int], n: int) -> list[float]:
    return [p / n for p in passed]


def compute_stats(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, drop reasons, routes, pass rates, lengths and tokens over finished items."""
    kept = [e for e in entries if e.get("kept")]
    with_cons = [e for e in entries if e.get("n_constraints") and "sample_passed" in e]

    def mean_frac(key: str, rows: list[dict[str, Any]]) -> float | None:
        vals = [f for e in rows for f in _frac(e.get(key) or [], e["n_constraints"])]
        return round(mean(vals), 4) if vals else None

    kept_cons = [e for e in kept if e.get("n_constraints")]
    usage = Counter()
    for e in entries:
        usage.update(e.get("usage") or {})
    return {
        "items_done": len(entries),
        "kept": len(kept),
        "acceptance_rate": round(len(kept) / len(entries), 4) if entries else 0.0,
        "drop_reasons": dict(Counter(e["reason"] for e in entries if not e.get("kept")).most_common()),
        "chosen_route": dict(Counter(e["route"] for e in kept)),
        "candidate_problems": dict(sum((Counter(e.get("candidate_problems") or {}) for e in entries), Counter())),
        "critique_verdicts": dict(sum((Counter(e.get("verdicts") or {}) for e in entries), Counter())),
        "pass_rate": {
            "samples": mean_frac("sample_passed", with_cons),
            "rewrites": mean_frac("rewrite_passed", with_cons),
            "chosen": round(mean(e["chosen_passed"] / e["n_constraints"] for e in kept_cons), 4) if kept_cons else None,
            "rejected": round(mean(e["rejected_passed"] / e["n_constraints"] for e in kept_cons), 4) if kept_cons else None,
        },
        "chars": {
            "chosen_mean": round(mean(e["chosen_chars"] for e in kept), 1) if kept else None,
            "rejected_mean": round(mean(e["rejected_chars"] for e in kept), 1) if kept else None,
        },
        "ref_logprob_straddles": sum(e.get("ref_straddled", 0) for e in kept),
        "cut_at_new_turn": sum(e.get("cut_turns", 0) for e in entries),
        "usage": dict(usage),
    }


def _bar(ax: Any, counts: dict[str, float], title: str) -> None:
    ax.bar(list(counts) or ["(none)"], list(counts.values()) or [0])
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)


def write_plots(meta_dir: Path, entries: list[dict[str, Any]], stats: dict[str, Any],
                task_word_lengths: list[int]) -> list[str]:
    """lengths.png, pass_rates.png, drop_reasons.png, instruction_lengths.png; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [e for e in entries if e.get("kept")]
    figs: dict[str, Any] = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([[e["chosen_chars"] for e in kept], [e["rejected_chars"] for e in kept]], bins=20,
            label=["chosen", "rejected"])
    ax.set_xlabel("characters"), ax.set_ylabel("pairs"), ax.legend(), ax.set_title("Response lengths")
    figs["lengths.png"] = fig
    fig, ax = plt.subplots(figsize=(6, 3.5))
    _bar(ax, {k: v for k, v in stats["pass_rate"].items() if v is not None}, "Share of constraints satisfied")
    ax.set_ylim(0, 1)
    figs["pass_rates.png"] = fig
    fig, ax = plt.subplots(figsize=(7, 3.8))
    _bar(ax, {"kept": stats["kept"], **stats["drop_reasons"]}, "Items: kept and drop reasons")
    figs["drop_reasons.png"] = fig
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(task_word_lengths or [0], bins=20)
    ax.set_xlabel("task words"), ax.set_ylabel("instructions"), ax.set_title("Instruction lengths")
    figs["instruction_lengths.png"] = fig
    for name, fig in figs.items():
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        atomic_write_bytes(meta_dir / name, buf.getvalue())
    return list(figs)


def _table(counts: dict[str, Any]) -> str:
    if not counts:
        return "(none)\n"
    return "| | count |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in counts.items())


def _audit_section(audit: dict[str, Any] | None) -> str:
    if not audit:
        return ""
    return ("## Audit of the kept pairs\n"
            f"`python -m pair_builder.audit` on {audit['sampled']} of {audit['pairs']} pairs: what each pair would "
            "teach besides following the instruction (chosen runs on into another turn, copies a few-shot example, "
            "loops, does not dominate rejected constraint by constraint, was truncated, is unrelated to rejected, or "
            "uses too few of the task's words). The builder's filters rule these out, so non-zero rates come from "
            "pairs made with filters off or from what the filters miss.\n\n"
            f"{audit['table']}\n")


def _extras_section(x: dict[str, Any] | None) -> str:
    if not x:
        return ""
    return ("## Extra pairs (`extras.parquet`)\n"
            "Checker pairs that reward a habit besides their constraints (chosen shows it, rejected does not): "
            f"{', '.join(f'{k} {v}' for k, v in x['rewarded_habits'].items()) or 'none'}. "
            f"pairs.stop_pairs={x['stop_pairs']} stop pairs per checker pair (a finished answer against a looping "
            f"or truncated one); pairs.repair_pairs={x.get('repair_pairs', 0.0)} format-repair pairs per checker pair "
            "(an answer with the formats it missed applied by rule, against itself as written); "
            f"then pairs.habit_contrast={x['habit_contrast']} habit-contrast pairs (an answer to "
            "an instruction that did not ask for the habit, against itself with the habit applied) per pair that "
            "pushes a habit up beyond those that push it down. `principle_id` names the kind; see "
            "`pair_builder.extras`.\n\n"
            "| kind | candidates | written |\n|---|---|---|\n"
            + "".join(f"| {k} | {x['candidates'].get(k, 0)} | {x['written'].get(k, 0)} |\n"
                      for k in sorted(set(x['candidates']) | set(x['written']))) + "\n"
            + ("What all the pairs push up (chosen shows the habit, rejected does not) and down, where the "
               "instruction asked for the habit and where it did not:\n\n" + balance_table(x["balance"]) + "\n"
               if x.get("balance") else ""))


def write_card(pairs_dir: Path, info: dict[str, Any], stats: dict[str, Any], plots: list[str],
               audit: dict[str, Any] | None = None) -> Path:
    """The dataset card ``README.md``: what made the pairs and what came out (and, given, the audit summary)."""
    s = info["sampling"]
    f = info.get("filters") or {}
    body = f"""---
pretty_name: "{info['run']} round {info['round']} preference pairs"
tags: [dpo, preference, constitutional-ai, instruction-following]
---
# Preference pairs: {info['run']}, round {info['round']}

Built by `python -m pair_builder` from the BASE model's own samples, critiques and rewrites; scored by the
eval's verifiable-instruction checkers. Load with `datasets.load_dataset("parquet", data_dir=<this dir>)`;
columns `prompt`/`chosen`/`rejected` feed TRL's DPOTrainer directly{', with `ref_chosen_logps`/`ref_rejected_logps` (reference log-probs from the server)' if info['ref_logprobs'] else ''}.

| | |
|---|---|
| model | `{info['model']}` (revision `{info['model_revision']}`) |
| constitution | `{info['constitution']}` sha256 `{info['constitution_sha256'][:16]}` ({info['principles']} principles) |
| prompt template | `{info['template_id']}` sha256 `{info['template_sha256'][:16]}` |
| sampling | k={s['k']}, temperature={s['temperature']}, top_p={s['top_p']}, max_tokens={s['max_tokens']}, revisions R={s['revisions']}, critique temperature={s['critique_temperature']}, seed={s['seed']} |
| no-constraint rule | {info['no_constraint_rule']} |
| filters | {', '.join(f'{k}={v}' for k, v in f.items()) or '(not recorded)'} |
| servers | {info['servers']} |
| instructions | {info['instructions']} after dedupe ({info['sources']}) |
| items done | {stats['items_done']} |
| pairs kept | {stats['kept']} (acceptance {stats['acceptance_rate']:.1%}) |
| tokens | prompt {stats['usage'].get('prompt_tokens', 0)}, completion {stats['usage'].get('completion_tokens', 0)}, requests {stats['usage'].get('requests', 0)} |
| cost | ${info['cost_usd']:.4f} for pair building, all submissions (cost.gpu_usd_per_hour={info['usd_per_hour']}); ${info['cost_per_pair']:.5f} per kept pair |

## Drop reasons
{_table(stats['drop_reasons'])}{_extras_section(info.get('extras'))}
## Which route produced the chosen response
{_table(stats['chosen_route'])}
## Candidates ruled out (scaffolding, truncation, copies, loops)
{stats.get('cut_at_new_turn', 0)} candidate(s) ran on into another turn and were cut there (counted as finished).

{_table(stats['candidate_problems'])}
## Share of constraints satisfied
{_table({k: v for k, v in stats['pass_rate'].items()})}
{_audit_section(audit)}## Plots and files
{''.join(f'![{p}](.meta/{p})' + chr(10) for p in plots)}
`.meta/stats.json` (all numbers), `.meta/done.jsonl` (one line per finished item), `.meta/instructions.jsonl`,
`.meta/diversity.json`, `.meta/manifest.json` (what this directory may hold), `.meta/audit.json` (the audit).
"""
    return atomic_write_text(pairs_dir / "README.md", body)


def run_audit(pairs_dir: Path, meta_dir: Path, *, sample: int, template: Any = None, constitution: Any = None,
              max_tokens: int | None = None) -> dict[str, Any] | None:
    """Defect rates of a sample of the kept pairs (``.meta/audit.json``), or None with no pairs or sample 0."""
    if sample <= 0 or not any(pairs_dir.glob("shard-*.parquet")):
        return None
    from pair_builder.audit import audit_dir, rate_table

    audit = audit_dir(pairs_dir, sample=sample, template=template, constitution=constitution, max_tokens=max_tokens)
    audit["table"] = rate_table(audit["rates"])
    atomic_write_json(meta_dir / "audit.json", audit)
    return audit


def write_report(pairs_dir: Path, meta_dir: Path, entries: list[dict[str, Any]], info: dict[str, Any],
                 task_word_lengths: list[int], *, template: Any = None, constitution: Any = None,
                 audit_sample: int = 200) -> dict[str, Any]:
    stats = compute_stats(entries)
    plots = write_plots(meta_dir, entries, stats, task_word_lengths)
    atomic_write_json(meta_dir / "stats.json", {**stats, "run": info})
    audit = run_audit(pairs_dir, meta_dir, sample=audit_sample, template=template, constitution=constitution,
                      max_tokens=(info.get("sampling") or {}).get("max_tokens"))
    write_card(pairs_dir, info, stats, plots, audit)
    return stats
