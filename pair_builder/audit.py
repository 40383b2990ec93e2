"""Audit preference pairs for the habits they would teach, and measure the filters on hand-labelled pairs.

    python -m pair_builder.audit runs/NAME/round-0/pairs [--sample 200] [--server URL --api-key KEY] [--json out.json]
    python -m pair_builder.audit --labelled tests/assets/labelled_pairs.jsonl [--sweep]
    python -m pair_builder.audit runs/NAME/round-0/pairs --replay-extras [--habit-contrast 1 --stop-pairs 0.5]

A pairs dir: a sample of its pairs (parquet shards), each checked for the defects below; a table of rates
(and JSON). With ``--server``, also whether chosen answers its instruction (relevance, one request per pair).
``--labelled``: each filter's precision and recall against hand labels (``tests/assets/labelled_pairs.jsonl``:
pairs from real runs with the filters off, each labelled per defect and overall "worth learning"); ``--sweep``
also prints the threshold sweeps the defaults were chosen on.

Defects of a pair (what the builder's filters now rule out):

* ``runs_on``: chosen runs on into another turn (``# Question: ...``; :func:`shared.prompting.new_turn_at`);
* ``copies_example``: chosen shares a run of ``COPY_SPAN`` words with a few-shot example answer;
* ``echoes_instruction``: chosen restates its instruction's constraint sentences (a run of
  :data:`pair_builder.verify.ECHO_SPAN` words of them, :func:`pair_builder.verify.echo_grams`); the labelled set
  has no label of its own for it, so it is measured against "not worth learning" only;
* ``looping``: chosen loops (:func:`eval.degeneration.is_looping`);
* ``not_dominant``: chosen does not pass every constraint rejected passes plus one more;
* ``truncated``: chosen hit the token limit (the done log's finish reason; without one: it ends mid-sentence
  and is at least ~``max_tokens`` long);
* ``too_different``: normalized edit distance above ``pairs.max_edit_distance``'s default;
* ``irrelevant``: chosen uses too few of the task's content words (``pairs.min_task_overlap``'s default,
  :func:`pair_builder.relevance.task_overlap`);
* ``irrelevant_pmi``: chosen's PMI relevance below ``MIN_PMI`` (only with ``--server``, or stored scores).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rapidfuzz.distance import Levenshtein

from eval.degeneration import fewshot_words, is_looping
from pair_builder.relevance import task_overlap
from pair_builder.verify import ExampleIndex, dominates, echo_grams, restates
from shared.prompting import BaseTemplate, load_template, new_turn_at

# The defaults of PairsConfig (shared/config.py), chosen on tests/assets/labelled_pairs.jsonl (--sweep).
DEFAULT_MAX_EDIT_DISTANCE = 0.8
DEFAULT_MIN_OVERLAP = 0.2
MIN_PMI = 0.0  # what the audit calls irrelevant under PMI (pairs.min_pmi is off by default)
DEFECTS = ("runs_on", "copies_example", "mentions_fewshot", "echoes_instruction", "looping", "not_dominant", "truncated",
           "too_different", "irrelevant", "irrelevant_pmi")
# defect -> the hand label it predicts in the labelled set
LABEL_OF = {"runs_on": "runs_on", "copies_example": "copies_example", "looping": "looping",
            "not_dominant": "chosen_not_better", "truncated": "truncated", "too_different": "too_different",
            "irrelevant": "irrelevant", "irrelevant_pmi": "irrelevant"}
_END = tuple('.!?)"\'*]`>:;')


def looks_truncated(text: str, max_tokens: int | None) -> bool:
    """No finish reason known: ends without closing punctuation and is about ``max_tokens`` long (~4 chars/token)."""
    t = text.rstrip()
    return bool(t) and not t.endswith(_END) and (max_tokens is None or len(t) >= 3.2 * max_tokens)


def task_of(instruction: str, constraints: list[dict[str, Any]]) -> str:
    """The instruction without its constraint sentences (seed and self-instruct items: task + descriptions)."""
    from eval.constraints import describe
    from shared.records import Constraint

    task = instruction
    for c in constraints:
        try:
            task = task.replace(describe(Constraint.model_validate(c)), " ")
        except Exception:  # noqa: BLE001 - an unknown or odd constraint: leave its text in
            continue
    return " ".join(task.split())


def echoes(text: str, instruction: str, constraints: list[dict[str, Any]]) -> bool:
    """Whether ``text`` restates the constraint sentences of ``instruction`` (:func:`pair_builder.verify.echo_grams`)."""
    from shared.records import Constraint

    return restates(text, echo_grams(instruction, [Constraint.model_validate(c) for c in constraints]))


def pair_defects(pair: dict[str, Any], *, examples: ExampleIndex, template: BaseTemplate,
                 max_edit_distance: float = DEFAULT_MAX_EDIT_DISTANCE, min_overlap: float | None = DEFAULT_MIN_OVERLAP,
                 min_pmi: float | None = MIN_PMI, max_tokens: int | None = None) -> dict[str, bool | None]:
    """Which defects ``pair`` has (None: not measurable, e.g. PMI without a score).

    ``pair``: ``instruction``, ``chosen``, ``rejected``; optional ``task``, ``constraints``,
    ``chosen_passed``/``rejected_passed`` (per constraint), ``chosen_finish``, ``scores`` ({"pmi_chosen": ...}).
    """
    ins, ch, rj = pair["instruction"], pair["chosen"], pair["rejected"]
    cp, rp = pair.get("chosen_passed"), pair.get("rejected_passed")
    finish = pair.get("chosen_finish")
    pmi = (pair.get("scores") or {}).get("pmi_chosen")
    overlap = task_overlap(pair.get("task") or task_of(ins, pair.get("constraints") or []), ch)
    return {
        "runs_on": new_turn_at(ch, ins, [*template.stop, "\n" + template.query_prefix.strip()]) is not None,
        "copies_example": examples.copies(ch, ins),
        "mentions_fewshot": examples.mentions(ch, ins) if examples.fewshot else None,
        "echoes_instruction": echoes(ch, ins, pair.get("constraints") or []),
        "looping": is_looping(ch),
        "not_dominant": None if cp is None or rp is None else not dominates(list(cp), list(rp)),
        "truncated": finish == "length" if finish else looks_truncated(ch, max_tokens),
        "too_different": Levenshtein.normalized_distance(ch.lower(), rj.lower()) > max_edit_distance,
        "irrelevant": None if overlap is None or min_overlap is None else overlap < min_overlap,
        **({} if pmi is None or min_pmi is None else {"irrelevant_pmi": pmi < min_pmi}),
    }


def rates(flags: list[dict[str, bool | None]]) -> dict[str, dict[str, Any]]:
    """Per defect: pairs measured, pairs flagged, rate."""
    out = {}
    for d in (d for d in DEFECTS if any(d in f for f in flags)):
        vals = [f[d] for f in flags if f.get(d) is not None]
        out[d] = {"measured": len(vals), "flagged": sum(vals), "rate": round(sum(vals) / len(vals), 4) if vals else None}
    any_vals = [any(bool(f.get(d)) for d in DEFECTS) for f in flags]
    out["any"] = {"measured": len(any_vals), "flagged": sum(any_vals),
                  "rate": round(sum(any_vals) / len(any_vals), 4) if any_vals else None}
    return out


def rate_table(r: dict[str, dict[str, Any]]) -> str:
    lines = ["| defect | pairs checked | flagged | rate |", "|---|---|---|---|"]
    for d, v in r.items():
        rate = "n/a" if v["rate"] is None else f"{v['rate']:.1%}"
        lines.append(f"| {d} | {v['measured']} | {v['flagged']} | {rate} |")
    return "\n".join(lines) + "\n"


# --- a pairs dir -------------------------------------------------------------------------------------------

def read_pairs(pairs_dir: Path, template: BaseTemplate) -> list[dict[str, Any]]:
    """Every pair of the dir's shards, with the done log's per-item details (finish reasons) when present."""
    import pyarrow.parquet as pq

    done: dict[str, dict[str, Any]] = {}
    done_path = pairs_dir / ".meta" / "done.jsonl"
    if done_path.exists():
        for line in done_path.read_text().splitlines():
            if line.strip():
                e = json.loads(line)
                done[e["id"]] = e
    rows = []
    for shard in sorted(pairs_dir.glob("shard-*.parquet")):
        for r in pq.read_table(shard).to_pylist():
            e = done.get(r["id"], {})
            cons = json.loads(r.get("constraints") or "[]")
            rows.append({
                "id": r["id"], "instruction": template.instruction_of(r["prompt"]), "chosen": r["chosen"],
                "rejected": r["rejected"], "constraints": cons,
                "chosen_passed": e.get("chosen_passed_list"), "rejected_passed": e.get("rejected_passed_list"),
                "chosen_finish": e.get("chosen_finish"), "task": e.get("task"),
                "scores": {"pmi_chosen": e["chosen_pmi"]} if e.get("chosen_pmi") is not None else {},
            })
    return rows


def _rescore(rows: list[dict[str, Any]]) -> None:
    """Per-constraint checks for rows whose done entry did not keep them (older pair dirs)."""
    from eval.ifeval import check

    for r in rows:
        if r["chosen_passed"] is None and r["constraints"]:
            r["chosen_passed"] = [check(c["id"], c.get("kwargs") or {}, r["instruction"], r["chosen"]) for c in r["constraints"]]
            r["rejected_passed"] = [check(c["id"], c.get("kwargs") or {}, r["instruction"], r["rejected"])
                                    for c in r["constraints"]]


def audit_dir(pairs_dir: str | Path, *, sample: int | None = 200, seed: int = 0, template: BaseTemplate | None = None,
              constitution: Any = None, client: Any = None, model: str | None = None,
              max_tokens: int | None = None) -> dict[str, Any]:
    """Defect rates over a sample of a pairs dir (all pairs when ``sample`` is None or larger)."""
    from pair_builder.constitution import load_constitution

    pairs_dir = Path(pairs_dir)
    template = template or load_template()
    examples = ExampleIndex.from_sources(template, constitution or load_constitution())
    if max_tokens is None:
        man = pairs_dir / ".meta" / "manifest.json"
        if man.exists():
            max_tokens = json.loads(man.read_text()).get("sampling", {}).get("max_tokens")
    rows = read_pairs(pairs_dir, template)
    total = len(rows)
    # the example words rare among the pairs' instructions (pair building judges by its round's instructions)
    examples = examples.with_fewshot(fewshot_words(template.example_texts(), [r["instruction"] for r in rows]))
    if sample is not None and len(rows) > sample:
        rows = random.Random(seed).sample(rows, sample)
    _rescore(rows)
    if client is not None:
        from pair_builder.relevance import pmi_scores

        for r in rows:
            if not r["scores"]:
                r["scores"] = {"pmi_chosen": pmi_scores(client, model, r.get("task") or r["instruction"], [r["chosen"]])[0]}
    flags = [pair_defects(r, examples=examples, template=template, max_tokens=max_tokens) for r in rows]
    return {"pairs": total, "sampled": len(rows), "rates": rates(flags),
            "examples": {d: [r["id"] for r, f in zip(rows, flags, strict=True) if f.get(d)][:5] for d in DEFECTS}}


# --- the labelled set ----------------------------------------------------------------------------------------

def load_labelled(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def precision_recall(pred: Iterable[bool], truth: Iterable[bool]) -> dict[str, Any]:
    pairs = list(zip(pred, truth, strict=True))
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    fn = sum(t and not p for p, t in pairs)
    return {"tp": tp, "fp": fp, "fn": fn, "flagged": tp + fp, "positives": tp + fn,
            "precision": round(tp / (tp + fp), 3) if tp + fp else None,
            "recall": round(tp / (tp + fn), 3) if tp + fn else None}


def evaluate_labelled(rows: list[dict[str, Any]], *, template: BaseTemplate | None = None, constitution: Any = None,
                      max_edit_distance: float = DEFAULT_MAX_EDIT_DISTANCE,
                      min_overlap: float | None = DEFAULT_MIN_OVERLAP, min_pmi: float | None = MIN_PMI) -> dict[str, Any]:
    """Each filter against its own label, and against "not worth learning"; plus all filters together."""
    from pair_builder.constitution import load_constitution

    template = template or load_template()
    examples = ExampleIndex.from_sources(template, constitution or load_constitution()).with_fewshot(
        fewshot_words(template.example_texts(), [r["instruction"] for r in rows]))
    flags = [pair_defects(r, examples=examples, template=template, max_edit_distance=max_edit_distance,
                          min_overlap=min_overlap, min_pmi=min_pmi) for r in rows]
    not_worth = [not r["labels"]["worth_learning"] for r in rows]
    out: dict[str, Any] = {"pairs": len(rows), "not_worth_learning": sum(not_worth), "filters": {}}
    for d in DEFECTS:
        pred = [bool(f.get(d)) for f in flags]
        label = LABEL_OF.get(d)
        own = precision_recall(pred, [r["labels"][label] for r in rows]) if label else {}
        out["filters"][d] = {"label": label, **own, "vs_not_worth": precision_recall(pred, not_worth)}
    on = [d for d in DEFECTS if d != "irrelevant_pmi"]  # the filters on by default
    pred_any = [any(bool(f.get(d)) for d in on) for f in flags]
    out["all_filters_vs_not_worth"] = precision_recall(pred_any, not_worth)
    old = [bool(f["runs_on"] or f["copies_example"] or f["looping"]) for f in flags]  # the candidate-level filters
    out["candidate_filters_vs_not_worth"] = precision_recall(old, not_worth)
    return out


def sweeps(rows: list[dict[str, Any]], template: BaseTemplate | None = None, constitution: Any = None) -> dict[str, Any]:
    """Precision/recall of the thresholded filters over their thresholds (what the defaults were picked on)."""
    from pair_builder.constitution import load_constitution

    template = template or load_template()
    idx = ExampleIndex.from_sources(template, constitution or load_constitution())
    span = [idx.longest_span(r["chosen"]) for r in rows]
    copy = {n: precision_recall([s >= n for s in span], [r["labels"]["copies_example"] for r in rows])
            for n in (4, 5, 6, 7, 8, 10, 12)}
    dist = [Levenshtein.normalized_distance(r["chosen"].lower(), r["rejected"].lower()) for r in rows]
    edit = {t: {"too_different": precision_recall([d > t for d in dist], [r["labels"]["too_different"] for r in rows]),
                "not_worth": precision_recall([d > t for d in dist], [not r["labels"]["worth_learning"] for r in rows]),
                "drops": sum(d > t for d in dist)}
            for t in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)}
    irr = [r["labels"]["irrelevant"] for r in rows]
    nw = [not r["labels"]["worth_learning"] for r in rows]
    pmi = [(r.get("scores") or {}).get("pmi_chosen") for r in rows]
    ov = [task_overlap(r.get("task") or task_of(r["instruction"], r.get("constraints") or []), r["chosen"]) for r in rows]

    def sweep(vals: list[float | None], ts: tuple[float, ...]) -> dict[float, Any]:
        return {t: {"irrelevant": precision_recall([v is not None and v < t for v in vals], irr),
                    "not_worth": precision_recall([v is not None and v < t for v in vals], nw)} for t in ts}

    return {"copy_span": copy, "max_edit_distance": edit,
            "min_task_overlap": sweep(ov, (0.1, 0.2, 0.3, 0.4, 0.5)), "auc_task_overlap": _auc(ov, irr),
            "min_pmi": sweep(pmi, (-0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.5)), "auc_pmi": _auc(pmi, irr)}


def _auc(scores: list[float | None], positive: list[bool]) -> float | None:
    """ROC AUC of "lower score = positive" (how well a threshold on the score can separate the label)."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p and s is not None]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p and s is not None]
    if not pos or not neg:
        return None
    return round(sum((a < b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg)), 3)


def labelled_table(ev: dict[str, Any]) -> str:
    lines = [f"{ev['pairs']} labelled pairs, {ev['not_worth_learning']} not worth learning", "",
             "| filter | label | flagged | precision | recall | precision vs not-worth | recall vs not-worth |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    for d, v in ev["filters"].items():
        w = v["vs_not_worth"]
        label = f"{v['label']} ({v['positives']})" if v["label"] else "(no label)"
        lines.append(f"| {d} | {label} | {w['flagged']} | {fmt(v.get('precision'))} | "
                     f"{fmt(v.get('recall'))} | {fmt(w['precision'])} | {fmt(w['recall'])} |")
    a = ev["all_filters_vs_not_worth"]
    lines.append(f"| any filter | not worth ({a['positives']}) | {a['flagged']} | {fmt(a['precision'])} | "
                 f"{fmt(a['recall'])} | | |")
    return "\n".join(lines) + "\n"


def replay_extras(pairs_dir: str | Path, *, habit_contrast: float = 1.0, stop_pairs: float = 0.0, seed: int = 0,
                  min_overlap: float | None = 0.2, records: bool = False,
                  incidental_weight: float = 1.0, repair_pairs: float = 0.0,
                  no_repair: Sequence[str] = ()) -> dict[str, Any]:
    """What :mod:`pair_builder.extras` adds to a built round, replayed on its ``.meta/candidates.jsonl``
    (written with ``pairs.record_candidates``) without a server: the extra pairs by kind and the habit balance
    (:func:`pair_builder.extras.habit_balance`) of the checker pairs alone and with the extras; with ``records``,
    the extra pairs themselves too (no reference log-probs)."""
    import pyarrow.parquet as pq

    from pair_builder.extras import habit_balance, item_extras, select_extras
    from pair_builder.sample import Candidate
    from pair_builder.verify import Relevance, check_text
    from shared.prompting import load_template
    from shared.records import Constraint

    tpl = load_template()  # the project's: the prompt of an item without a checker pair
    d = Path(pairs_dir)
    path = d / ".meta" / "candidates.jsonl"
    if not path.exists() and path.with_suffix(".jsonl.gz").exists():  # as kept in docs/runs
        path = path.with_suffix(".jsonl.gz")
    if not path.exists():
        raise SystemExit(f"{path} not found: build the round with pairs.record_candidates=true to replay it")
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    checker = {r["id"]: r for shard in sorted(d.glob("shard-*.parquet")) for r in pq.read_table(shard).to_pylist()}
    round_of = next(iter(checker.values()), {})  # the round's model and number, for items without a pair
    entries = []
    for line in text.splitlines():
        row = json.loads(line)
        cands = [Candidate(**{k: c.get(k) for k in ("text", "route", "finish_reason", "parent", "pass_no",
                                                      "critique", "verdict", "problem", "overlap")},
                           passed=list(c["passed"])) for c in row["candidates"]]
        cons = [Constraint(**c) for c in row["constraints"]]
        kept = (row["chosen"], row["rejected"]) if row["id"] in checker else None
        xs = item_extras(cands, kept=kept, constraint_ids=[c.id for c in cons],
                         check=lambda t, ins=row["instruction"], cs=cons: check_text(t, ins, cs),
                         relevance=Relevance(min_overlap=min_overlap), repair=repair_pairs > 0,
                         constraints=cons, no_repair=no_repair)
        base = checker.get(row["id"]) or {
            "prompt": tpl.render(row["instruction"]), "instruction_id": row["id"],
            "constraints": json.dumps(row["constraints"], sort_keys=True),
            **{k: round_of.get(k) for k in ("model", "round")}}  # an item without a checker pair
        entries.append({"id": row["id"], "extras": [
            {"kind": x["kind"], "record": {**base, "chosen": x["chosen"], "rejected": x["rejected"],
                                           "principle_id": x["kind"], "chosen_passed": x["chosen_passed"],
                                           "rejected_passed": x["rejected_passed"]}} for x in xs]})
    extras = select_extras(entries, checker, habit_contrast=habit_contrast, stop_pairs=stop_pairs, seed=seed,
                           incidental_weight=incidental_weight, repair_pairs=repair_pairs)
    return {"pairs": len(checker), "items": len(entries), **({"records": extras} if records else {}),
            "candidates": dict(Counter(x["kind"] for e in entries for x in e["extras"]).most_common()),
            "extras": dict(Counter(r["principle_id"] for r in extras).most_common()),
            "balance_pairs": habit_balance(list(checker.values())),
            "balance_with_extras": habit_balance([*checker.values(), *extras])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pair_builder.audit", description=__doc__.split("\n")[0])
    ap.add_argument("pairs_dir", nargs="?", help="a pairs dir (runs/NAME/round-K/pairs)")
    ap.add_argument("--sample", type=int, default=200, help="pairs to check (default 200; 0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server", help="gen_server URL: also score relevance (one request per pair)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default=None, help="served model name (default: the server's first)")
    ap.add_argument("--template", default=None, help="prompt template the pairs were made with (default: the project's)")
    ap.add_argument("--json", default=None, help="also write the result as JSON here")
    ap.add_argument("--labelled", default=None, help="a labelled JSONL: print each filter's precision/recall")
    ap.add_argument("--sweep", action="store_true", help="with --labelled: the threshold sweeps too")
    ap.add_argument("--replay-extras", action="store_true", help="with a pairs dir: the extra pairs its recorded "
                    "candidates give (pair_builder.extras) and the habit balance with and without them")
    ap.add_argument("--habit-contrast", type=float, default=1.0, help="with --replay-extras (pairs.habit_contrast)")
    ap.add_argument("--incidental-weight", type=float, default=1.0,
                    help="with --replay-extras (pairs.incidental_habit_weight)")
    ap.add_argument("--stop-pairs", type=float, default=0.0, help="with --replay-extras (pairs.stop_pairs)")
    ap.add_argument("--repair-pairs", type=float, default=0.0, help="with --replay-extras (pairs.repair_pairs)")
    ap.add_argument("--config", default=None, help="with --replay-extras: its eval.heldout_types are never "
                    "repaired (default: the schema's)")
    args = ap.parse_args(argv)
    template = load_template(args.template)
    if args.labelled:
        rows = load_labelled(args.labelled)
        res = evaluate_labelled(rows, template=template)
        print(labelled_table(res))
        if args.sweep:
            res["sweeps"] = sweeps(rows, template)
            print(json.dumps(res["sweeps"], indent=1))
    elif args.pairs_dir and args.replay_extras:
        from pair_builder.extras import balance_table
        from shared.config import EvalConfig, load_config

        res = replay_extras(args.pairs_dir, habit_contrast=args.habit_contrast, stop_pairs=args.stop_pairs,
                            incidental_weight=args.incidental_weight, repair_pairs=args.repair_pairs,
                            no_repair=list(load_config(args.config).eval.heldout_types) if args.config else
                            list(EvalConfig().heldout_types), seed=args.seed)
        print(f"{res['pairs']} checker pairs from {res['items']} items; extra-pair candidates {res['candidates']}; "
              f"selected {res['extras']}\n")
        print("Checker pairs alone:\n" + balance_table(res["balance_pairs"]))
        print("With the extra pairs:\n" + balance_table(res["balance_with_extras"]))
    elif args.pairs_dir:
        client = model = None
        if args.server:
            from shared.client import make_client, served_models

            client = make_client(args.server, args.api_key, timeout=300, max_retries=2)
            model = args.model or served_models(args.server, args.api_key)[0]["id"]
        res = audit_dir(args.pairs_dir, sample=args.sample or None, seed=args.seed, template=template, client=client,
                        model=model)
        print(f"{res['sampled']} of {res['pairs']} pairs checked\n")
        print(rate_table(res["rates"]))
    else:
        ap.error("give a pairs dir or --labelled FILE")
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
