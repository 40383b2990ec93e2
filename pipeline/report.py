"""The run's final report: ``RUN/report.md`` and a self-contained ``RUN/report.html`` (PNGs embedded).

Scores per round with 95% bootstrap intervals; degeneration per round (truncation, loops, distinct-n,
length, unrequested habits) and whether each round passed its promotion guards; the score on the held-out
instruction types and IFEval by instruction type per round; pair counts and drop reasons, DPO curves, time
and cost per stage and per accepted pair, and the resolved config. Built from the files the stages wrote, so it can be
regenerated at any time: ``python -m pipeline report RUN``.
"""

from __future__ import annotations

import base64
import html
import json
import random
from pathlib import Path
from typing import Any

from eval.report import RATE_MEASURES, metric_parts, pooled
from pipeline.state import RunState
from shared.atomic import atomic_write_text
from shared.config import Config, dump_config
from shared.ledger import CostLedger
from shared.prompting import BaseTemplate, load_template
from shared.records import is_extra
from shared.rundir import RunDir

METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")
Block = tuple[str, Any]


def _read(p: Path) -> Any:
    return json.loads(p.read_text()) if p.exists() else None


def _ci(results_path: Path, metric: str, n_boot: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of one eval's metric over its prompts."""
    if not results_path.exists():
        return None
    rows = [json.loads(x) for x in results_path.read_text().splitlines() if x.strip()]
    if not rows:
        return None
    parts = [metric_parts(r, metric) for r in rows]
    rng = random.Random(seed)
    boots = [pooled([parts[rng.randrange(len(parts))] for _ in parts]) for _ in range(n_boot)]
    boots.sort()
    return boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]


def _scores_plot(rounds: list[tuple[int, dict[str, Any], tuple[float, float] | None]], metric: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ks = [k for k, _, _ in rounds]
    for m in METRICS:
        ax.plot(ks, [s[m] for _, s, _ in rounds], marker="o", label=m, lw=2.5 if m == metric else 1)
    lo = [ci[0] if ci else s[metric] for _, s, ci in rounds]
    hi = [ci[1] if ci else s[metric] for _, s, ci in rounds]
    ax.fill_between(ks, lo, hi, alpha=0.15, label=f"{metric} 95% CI")
    ax.set_xticks(ks)
    ax.set_xlabel("round (model_k = model after k DPO rounds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Instruction following by round")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _degeneration_plot(rows: list[tuple[int, dict[str, Any]]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [k for k, _ in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for m in RATE_MEASURES:
        vals = [f.get(m) for _, f in rows]
        if any(v is not None for v in vals):
            ax.plot(ks, [float("nan") if v is None else v for v in vals], marker="o", label=m.removesuffix("_rate"))
    ax.set_ylim(0, 1)
    ax.set_xticks(ks)
    ax.set_xlabel("round")
    ax.set_ylabel("share of answers")
    ax.set_title("Degeneration and unrequested habits")
    ax.legend(fontsize=7)
    for m, style in (("words_median", "-"), ("words_p90", "--"), ("words_mean", ":")):
        ax2.plot(ks, [f[m] for _, f in rows], marker="o", ls=style, label=m.removeprefix("words_"))
    ax2.set_xticks(ks)
    ax2.set_xlabel("round")
    ax2.set_ylabel("words per answer")
    ax2.set_ylim(bottom=0)
    ax2.set_title("Answer length")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "" if v is None else format(v, spec)


def _measure_blocks(cfg: Config, rd: RunDir, ks: list[int]) -> list[Block]:
    """Degeneration, guards, held-out types and IFEval by instruction type, per round."""
    from eval.degeneration import HABITS, flat
    from pipeline.run import _measures, guard_failures

    get = _measures(cfg, rd)
    blocks: list[Block] = []
    deg = [(k, flat(get(k)["degeneration"])) for k in ks if get(k)["degeneration"]]
    if deg:
        g = cfg.pipeline.guards
        rows = []
        for k, f in deg:
            fails = guard_failures(cfg, rd, k, get) if k in ks else []
            verdict = "baseline" if k == 0 else ("off" if not g.enabled else
                                                 "pass" if not fails else "FAIL: " + "; ".join(fails))
            rows.append([str(k), *(_fmt(f.get(m)) for m in RATE_MEASURES), _fmt(f["distinct_1"]), _fmt(f["distinct_2"]),
                         f"{f['words_median']:.0f} / {f['words_p90']:.0f} / {f['words_mean']:.0f}", verdict])
        blocks += [
            ("h2", "Degeneration by round"),
            ("p", f"Habits count only answers to prompts that did not ask for them (lowercase, uppercase: at least "
                  f"a few letters; no_comma: answers over 20 words; long: over {cfg.eval.long_answer_words} words, "
                  f"prompts without a length instruction; format: a P.S., a divider, section headers or a JSON "
                  f"answer the prompt did not ask for; fewshot: answers that talk about the prompt template's "
                  f"examples instead of the prompt). Round k>0 is promoted only if its gate metric rose and "
                  f"its guards pass: truncation +{g.max_truncation_rise}, loops +{g.max_loop_rise}, each habit "
                  f"+{g.max_habit_rise} over round 0, median length within {g.max_length_ratio}x of round 0's (either way), held-out "
                  f"score not significantly below round 0's or the previous round's by more than {g.heldout_tolerance}."),
            ("table", (["round", "truncated", "looping", "echoing", *(h.replace("_", " ") for h in HABITS),
                        "distinct-1", "distinct-2", "words median / p90 / mean", "guards"], rows)),
            ("img", _degeneration_plot(deg, rd.path / "degeneration_by_round.png"))]
    held = [(k, get(k)["heldout"]) for k in ks if get(k)["heldout"]]
    if held and any(h["n_instructions"] for _, h in held):
        base = held[0][1]
        rows = []
        for k, h in held:
            o = h["others"]
            d0 = (f"{h['loose'] - base['loose']:+.4f}" if h["loose"] is not None and base["loose"] is not None
                  and k != held[0][0] else "")
            rows.append([str(k), _fmt(h["strict"], ".4f"), _fmt(h["loose"], ".4f"), d0, str(h["n_instructions"]),
                         _fmt(o["strict"], ".4f"), _fmt(o["loose"], ".4f"), str(o["n_instructions"])])
        blocks += [("h2", "Held-out instruction types by round"),
                   ("p", "Instruction types pair building never draws (eval.heldout_types: "
                         + ", ".join(cfg.eval.heldout_types) + "): a gain here is teaching that generalises; a gain "
                         "only on the other types can be habits."),
                   ("table", (["round", "held-out strict", "held-out loose", "loose vs first", "n",
                               "others strict", "others loose", "n"], rows))]
    by_type: dict[str, dict[int, dict[str, Any]]] = {}
    for k in ks:
        s = _read(rd.round(k, create=False).eval / "scores.json") or {}
        for iid, v in s.get("by_instruction", {}).items():
            if ":" in iid:
                by_type.setdefault(iid, {})[k] = v
    if by_type:
        held_set = set(cfg.eval.heldout_types)
        rows = [[iid + (" (held out)" if iid in held_set else ""),
                 *(f"{v[k]['loose']:.3f}" if k in v else "" for k in ks),
                 str(v[max(v)]["count"])] for iid, v in sorted(by_type.items())]
        blocks += [("h2", "IFEval by instruction type and round (loose)"),
                   ("table", (["instruction", *[f"round {k}" for k in ks], "n"], rows))]
    return blocks


def _example_pairs(pairs_dir: Path, template: BaseTemplate, n: int = 3, seed: int = 0, chars: int = 600) -> list[str]:
    """``n`` checker pairs of a round (a seeded sample) and one extra pair of each kind (pair_builder.extras), as
    readable text: instruction, constraints, chosen, rejected."""
    import pyarrow.parquet as pq

    shards = sorted(pairs_dir.glob("*.parquet"))
    if not shards:
        return []
    cols = ["prompt", "chosen", "rejected", "constraints", "chosen_passed", "rejected_passed", "principle_id"]
    rows = [r for sh in shards for r in pq.read_table(sh, columns=[c for c in cols if c in
                                                                       pq.read_schema(sh).names]).to_pylist()]
    rng = random.Random(seed)
    checker = [r for r in rows if not is_extra(r.get("principle_id"))]
    picked = rng.sample(checker, min(n, len(checker)))
    for kind in sorted({r["principle_id"] for r in rows if is_extra(r.get("principle_id"))}):
        picked.append(rng.choice([r for r in rows if r.get("principle_id") == kind]))
    out = []
    for r in picked:
        query = template.instruction_of(r["prompt"])
        cut = lambda t: t if len(t) <= chars else t[:chars] + f" [... {len(t) - chars} more chars]"  # noqa: E731
        kind = f"EXTRA PAIR: {r['principle_id']}\n" if is_extra(r.get("principle_id")) else ""
        out.append(f"{kind}INSTRUCTION: {query}\nCONSTRAINTS: {r.get('constraints', '')}\n\n"
                   f"CHOSEN (passes {r.get('chosen_passed')}):\n{cut(r['chosen'])}\n\n"
                   f"REJECTED (passes {r.get('rejected_passed')}):\n{cut(r['rejected'])}")
    return out


def _training_blocks(cfg: Config, rd: RunDir, ks: list[int]) -> list[Block]:
    """Per round: how far the policy moved from the original base, held-out reward accuracy, example pairs."""
    rows, blocks = [], []
    for k in ks:
        r = rd.round(k, create=False)
        summ = _read(r.adapter / "train_summary.json") or {}
        merge = _read(r.merged / "merge_report.json") or {}
        if not summ and not merge:
            continue
        m = summ.get("metrics", {})
        rows.append([str(k), str(summ.get("train_pairs", "")), str(summ.get("eval_pairs", "")),
                     str(summ.get("global_step", "")), str(summ.get("status", "")),
                     _fmt(summ.get("start_kl_to_base"), ".3g"), _fmt(merge.get("adapter_effect_kl"), ".3g"),
                     _fmt(m.get("eval_rewards/accuracies"), ".3f"), _fmt(m.get("eval_rewards/margins"), ".3f")])
    if rows:
        blocks += [("h2", "Training by round"),
                   ("p", "KL: mean next-token KL to the ORIGINAL base on the merge's probe prompts, where round k "
                         "started (its training policy) and where it ended (its merged model, which round k+1 serves). "
                         "With train.continue_adapter each round starts where the last one ended. Held-out reward "
                         "accuracy: the share of held-out pairs (train.eval_split) whose chosen answer the trained "
                         "policy prefers over the rejected one, relative to the reference; 0.5 is chance."),
                   ("table", (["round", "train pairs", "held-out pairs", "steps", "status", "KL to base at start",
                               "KL to base after", "held-out reward accuracy", "held-out margin"], rows))]
    template = load_template(cfg.model.template)
    for k in ks:
        examples = _example_pairs(rd.round(k, create=False).pairs, template, seed=k)
        if examples:
            blocks.append(("h2", f"Example pairs, round {k}"))
            blocks += [("text", ex) for ex in examples]
    return blocks


def build(cfg: Config, rd: RunDir, state: RunState) -> list[Block]:
    metric = cfg.eval.gate_metric
    blocks: list[Block] = [("h1", f"Run {rd.path.name}")]
    st = state.stopped
    blocks.append(("p", f"Stopped after round {st['round']}: {st['reason']}. Final model: `{st['promoted_model']}`."
                   if st else "Not finished: `python -m pipeline run --config CFG` continues it."))

    rounds = []
    for k in rd.rounds():
        ev = rd.round(k, create=False).eval
        s = _read(ev / "scores.json")
        if s:
            rounds.append((k, s, _ci(ev / "results.jsonl", metric)))
    if rounds:
        rows = []
        for i, (k, s, ci) in enumerate(rounds):
            delta = f"{s[metric] - rounds[i - 1][1][metric]:+.4f}" if i else ""
            clean = s.get("prompt_loose_clean")
            rows.append([str(k), *(f"{s[m]:.4f}" for m in METRICS), "" if clean is None else f"{clean:.4f}",
                         f"{ci[0]:.3f}..{ci[1]:.3f}" if ci else "", delta, str(s["n_prompts"])])
        blocks += [("h2", f"Scores by round ({rounds[0][1].get('suite')} suite)"),
                   ("p", "prompt_loose_clean counts only answers that finished without looping or restating the "
                         "prompt: a base model's loops pass length instructions by accident, and its restated "
                         "requests pass format instructions (eval.report.CLEAN_METRICS)."),
                   ("table", (["round", *METRICS, "prompt_loose_clean", f"{metric} 95% CI", "gain", "prompts"],
                              rows)),
                   ("img", _scores_plot(rounds, metric, rd.path / "scores_by_round.png"))]
        blocks += _measure_blocks(cfg, rd, [k for k, _, _ in rounds])

    pair_rows, drops, cost_rows = [], {}, []
    total_cost, total_kept = 0.0, 0
    for k in rd.rounds():
        r = rd.round(k, create=False)
        stats = _read(r.pairs / ".meta" / "stats.json")
        if stats:
            total_kept += stats["kept"]
            pair_rows.append([str(k), str(stats["items_done"]), str(stats["kept"]), f"{stats['acceptance_rate']:.2f}",
                              ", ".join(f"{a}: {b}" for a, b in stats.get("chosen_route", {}).items())])
            for reason, n in stats.get("drop_reasons", {}).items():
                drops.setdefault(reason, {})[k] = n
        for stage, t in CostLedger(r.ledger).totals().items():
            total_cost += t.get("cost_usd", 0.0)
            cost_rows.append([str(k), stage, f"{t.get('wall_s', 0):.0f}", f"{t.get('cost_usd', 0):.4f}",
                              str(int(t.get("completion_tokens", 0)))])
    if pair_rows:
        ks = sorted({k for d in drops.values() for k in d})
        blocks += [("h2", "Preference pairs"),
                   ("table", (["round", "instructions", "kept", "acceptance", "chosen from"], pair_rows))]
        if drops:
            blocks.append(("table", (["drop reason", *[f"round {k}" for k in ks]],
                                     [[r, *(str(d.get(k, 0)) for k in ks)] for r, d in sorted(drops.items())])))
    for k in rd.rounds():
        tdir = rd.round(k, create=False).path / "train"
        summ = _read(rd.round(k, create=False).adapter / "train_summary.json")
        imgs = [p for p in (tdir / "loss.png", tdir / "rewards.png") if p.exists()]
        if summ or imgs:
            blocks.append(("h2", f"DPO, round {k}"))
            if summ:
                keep = {a: b for a, b in summ.items() if isinstance(b, (int, float, str)) and len(str(b)) < 80}
                blocks.append(("table", (["field", "value"], [[a, str(b)] for a, b in keep.items()])))
            blocks += [("img", p) for p in imgs]
    blocks += _training_blocks(cfg, rd, list(rd.rounds()))
    if cost_rows:
        per_pair = f"${total_cost / total_kept:.4f} per accepted pair" if total_kept else "no accepted pairs"
        blocks += [("h2", "Time and cost"),
                   ("p", f"Total ${total_cost:.4f} at ${cfg.cost.gpu_usd_per_hour}/hr; {per_pair}."),
                   ("table", (["round", "stage", "wall s", "cost $", "completion tokens"], cost_rows))]
    blocks += [("h2", "Resolved config"), ("pre", dump_config(cfg))]
    return blocks


def to_markdown(blocks: list[Block], base: Path) -> str:
    out = []
    for kind, v in blocks:
        if kind == "h1":
            out.append(f"# {v}\n")
        elif kind == "h2":
            out.append(f"## {v}\n")
        elif kind == "p":
            out.append(f"{v}\n")
        elif kind == "table":
            head, rows = v
            out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                    *("| " + " | ".join(r) + " |" for r in rows), ""]
        elif kind == "img":
            rel = Path(v).relative_to(base) if Path(v).is_relative_to(base) else v
            out.append(f"![{Path(v).name}]({rel})\n")
        elif kind == "pre":
            out.append(f"```yaml\n{v}```\n")
        elif kind == "text":
            out.append(f"```text\n{v}\n```\n")
    return "\n".join(out)


def to_html(blocks: list[Block]) -> str:
    e = html.escape
    body = []
    for kind, v in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{e(v)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{e(v)}</p>")
        elif kind == "table":
            head, rows = v
            body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
        elif kind == "img":
            data = base64.b64encode(Path(v).read_bytes()).decode()
            body.append(f'<img alt="{e(Path(v).name)}" src="data:image/png;base64,{data}">')
        elif kind in ("pre", "text"):
            body.append(f"<pre>{e(v)}</pre>")
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}pre{background:#f6f6f6;"
             "padding:1em;overflow:auto}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def write_report(cfg: Config, rd: RunDir, state: RunState) -> Path:
    blocks = build(cfg, rd, state)
    atomic_write_text(rd.path / "report.html", to_html(blocks))
    return atomic_write_text(rd.path / "report.md", to_markdown(blocks, rd.path))
