"""Do stop pairs teach "be short", and does cutting the loop fix it? One built round's pairs, several training arms,
each scored on the official IFEval in the same run: a round in minutes on a GPU, without a server.

    python bench/length_probe.py --pairs RUN/round-0/pairs [--config configs/base-gpu.yaml] [--base gemma3-270m]
        [--arms base,built,cut,checker,ld] [--arm "NAME SOURCE[+MOD...] [key=value ...]"]... [--limit N]
        [--suite own|ifeval] [--variants 12] [--max-new-tokens 512] [--batch 128] [--out DIR]

The first GPU round with stop pairs (whole loops of ~200 words as the rejected side, against finished answers of
~25) cut loops from 39% to 1%, and the median answer from 26 words to 11; IFEval fell with it. The arms, each a
fresh LoRA from the base trained with the config's ``train`` settings (the trainer scores its own reference):

* ``base``: no training, the baseline;
* ``built``: the round's checker pairs plus its extras as they were built (the run's own recipe);
* ``cut``: the same, with each stop pair's rejected loop cut just past its first repeat
  (:func:`pair_builder.extras.cut_loop`, what pair building does now); a stop pair whose loop is not found goes;
* ``checker``: the checker pairs alone;
* ``ld``: ``built`` trained with ``train.ld_alpha=0`` (LD-DPO: only the shared length of each pair counts).

``--arm`` adds an arm of your own, e.g. ``--arm "sft cut+noecho train.loss_type=[sigmoid,sft]"`` (DPO plus an SFT
term) or ``--arm "rft built train.method=sft"`` (``trainer.sft``: SFT on the chosen answers alone): a name, a
source (``built``, ``cut`` or ``checker``) with modifiers (``+noecho``: without the pairs whose chosen answer
restates its instruction's constraint sentences, :func:`pair_builder.verify.echo_grams`; ``+stopF``: keep the
share F of the stop pairs, e.g. ``+stop0.3``; ``+nostop``, ``+nocontrast``; ``+ctr``: the habit contrasts made
again as pair building makes them now, with the arm's ``pairs.habit_contrast`` and
``pairs.incidental_habit_weight``; ``+rep``: the format-repair pairs pair building would add with the arm's
``pairs.repair_pairs``, or 0.5 when that is 0, replayed from the round's recorded candidates,
``.meta/candidates.jsonl[.gz]``, :mod:`pair_builder.repair`; ``+norep``: without the round's repair pairs;
``+repin``: only the repair pairs that end as the answer as written did, :func:`pair_builder.repair.same_ending`),
then config overrides.

The arms are scored on a development suite by default (``--suite own``: the seed tasks pair building never uses,
x ``--variants`` constraint draws, the same checkers as IFEval), so that a recipe chosen here is not chosen on the
official 541 prompts it is then reported on. ``--suite ifeval`` scores those, for a diagnosis.

Generation is greedy with transformers at the served dtype (float32), cut at the template's stop strings and where
the model starts another turn, and scored as ``python -m eval`` scores (:func:`eval.run.score_responses`). Prints,
per arm: the four IFEval accuracies, the held-out types, median words, loop, truncation and habit rates, each with
its difference to ``base``; writes ``DIR/ARM/results.jsonl`` (the answers, to read) and ``DIR/probe.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REF_COLS = ("ref_chosen_logps", "ref_rejected_logps")
ARMS = ("base", "built", "cut", "checker", "ld")


def _rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [{k: v for k, v in r.items() if k not in REF_COLS} for r in pq.read_table(path).to_pylist()]


BUILT_IN = {"built": "built", "cut": "cut", "checker": "checker", "ld": "built train.ld_alpha=0.0"}


def rebuild_contrasts(checker: list[dict], stops: list[dict], *, habit_contrast: float,
                      incidental_weight: float) -> list[dict]:
    """The habit contrasts pair building would add to these checker and stop pairs today: the candidates
    (:func:`pair_builder.extras.contrasts` of each checker pair's chosen answer that passes no constraint the
    answer fails), chosen by :func:`pair_builder.extras.select_extras` itself."""
    from pair_builder.extras import CONTRAST_PREFIX, contrasts, select_extras
    from pair_builder.verify import check_text, dominates
    from shared.prompting import load_template
    from shared.records import Constraint

    tpl = load_template()
    entries = []
    for r in checker:
        cons = [Constraint(**c) for c in json.loads(r["constraints"] or "[]")]
        ins = tpl.instruction_of(r["prompt"])
        chosen_passed = check_text(r["chosen"], ins, cons)
        entries.append({"id": r["id"], "extras": [
            {"kind": f"{CONTRAST_PREFIX}{h}", "record": {**r, "rejected": changed, "principle_id": f"{CONTRAST_PREFIX}{h}"}}
            for h, changed in contrasts(r["chosen"], [c.id for c in cons]).items()
            if dominates(chosen_passed, check_text(changed, ins, cons), strict=False)]})
    # the stop pairs count toward each habit's push as they do in pair building; none are taken again
    records = {r["id"]: r for r in [*checker, *stops]}
    return select_extras(entries, records, habit_contrast=habit_contrast, stop_pairs=0.0,
                         incidental_weight=incidental_weight)


def arm_pairs(pairs_dir: Path, source: str, pairs=None) -> tuple[list[dict], list[dict]]:
    """(checker rows, extra rows) that ``source`` (``built|cut|checker`` and ``+`` modifiers, see the module doc)
    trains on, without reference log-prob columns. ``pairs``: the arm's ``pairs`` config section (``+ctr``;
    default: the schema's defaults)."""
    from pair_builder.audit import echoes
    from pair_builder.extras import EXTRAS_FILE, cut_loop
    from pair_builder.repair import same_ending
    from pair_builder.sample import Candidate
    from shared.config import PairsConfig
    from shared.prompting import load_template
    from shared.records import REPAIR_KIND

    arm, *mods = source.split("+")
    if arm not in ("built", "cut", "checker"):
        raise ValueError(f"unknown source {arm!r}: built, cut or checker")
    checker = [r for sh in sorted(pairs_dir.glob("shard-*.parquet")) for r in _rows(sh)]
    extras = _rows(pairs_dir / EXTRAS_FILE) if (pairs_dir / EXTRAS_FILE).exists() else []
    for mod in mods:
        if mod == "noecho":
            tpl = load_template()
            keep = lambda r: not echoes(r["chosen"], tpl.instruction_of(r["prompt"]),  # noqa: E731
                                        json.loads(r["constraints"] or "[]"))
            checker, extras = [r for r in checker if keep(r)], [r for r in extras if keep(r)]
        elif mod == "nostop" or mod.startswith("stop"):
            share = 0.0 if mod == "nostop" else float(mod[4:])
            stops = [r for r in extras if r["principle_id"] == "stop"]
            drop = {r["id"] for r in stops[round(share * len(stops)):]}
            extras = [r for r in extras if r["id"] not in drop]
        elif mod == "nocontrast":
            extras = [r for r in extras if not r["principle_id"].startswith("contrast:")]
        elif mod == "norep":
            extras = [r for r in extras if r["principle_id"] != REPAIR_KIND]
        elif mod == "repin":
            extras = [r for r in extras if r["principle_id"] != REPAIR_KIND or same_ending(r["chosen"], r["rejected"])]
        elif mod == "ctr":
            extras = [r for r in extras if not r["principle_id"].startswith("contrast:")]
            pairs = pairs or PairsConfig()
            extras += rebuild_contrasts(checker, [r for r in extras if r["principle_id"] == "stop"],
                                        habit_contrast=pairs.habit_contrast,
                                        incidental_weight=pairs.incidental_habit_weight)
        elif mod == "rep":
            from pair_builder.audit import replay_extras
            from shared.config import EvalConfig

            pairs = pairs or PairsConfig()
            got = replay_extras(pairs_dir, habit_contrast=0.0, stop_pairs=0.0, records=True,
                                repair_pairs=pairs.repair_pairs or 0.5, no_repair=list(EvalConfig().heldout_types))
            extras += [{k: v for k, v in r.items() if not k.startswith("ref_")}
                       for r in got["records"] if r["principle_id"] == REPAIR_KIND]
        else:
            raise ValueError(f"unknown modifier +{mod}: noecho, stopF, nostop, nocontrast, ctr, rep, norep, repin")
    if arm == "checker":
        return checker, []
    if arm == "cut":
        out = []
        for r in extras:
            if r["principle_id"] == "stop":
                cut = cut_loop(Candidate(text=r["rejected"], route="sample", finish_reason="length",
                                         problem="truncated"))
                if cut is None:
                    continue
                r = {**r, "rejected": cut[0]}
            out.append(r)
        extras = out
    return checker, extras


def generate(model, tok, prompts: list[str], *, max_new_tokens: int, batch: int, stops: list[str]) -> list[tuple]:
    """Greedy completions ``(text, finish_reason)``: "stop" at EOS or a stop string, else "length"."""
    import torch
    from tqdm import tqdm

    tok.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[tuple] = [("", "length")] * len(prompts)
    for s in tqdm(range(0, len(order), batch), desc="generate", unit="batch"):
        idx = order[s:s + batch]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for i, row in zip(idx, gen[:, enc.input_ids.shape[1]:]):
            ended = bool((row == tok.eos_token_id).any())
            text = tok.decode(row, skip_special_tokens=True)
            cuts = [text.index(x) for x in stops if x in text]
            out[i] = (text[:min(cuts)] if cuts else text, "stop" if ended or cuts else "length")
    return out


def _summary(scores: dict) -> dict[str, float | None]:
    from eval.degeneration import flat

    d = flat(scores["degeneration"])
    return {"prompt_loose": scores["prompt_loose"], "instruction_loose": scores["instruction_loose"],
            "prompt_loose_clean": scores["prompt_loose_clean"], "instruction_loose_clean": scores["instruction_loose_clean"],
            "prompt_strict": scores["prompt_strict"], "heldout_loose": (scores["heldout"] or {}).get("loose"),
            "words_median": d["words_median"], "loop_rate": d["loop_rate"], "echo_rate": d["echo_rate"],
            "truncation_rate": d["truncation_rate"],
            "lowercase_rate": d["lowercase_rate"], "no_comma_rate": d["no_comma_rate"],
            "format_rate": d.get("format_rate"), "bullets_rate": d.get("bullets_rate"),
            "fewshot_rate": d.get("fewshot_rate")}


CI_KEYS = (("metrics", "prompt_loose"), ("metrics", "prompt_loose_clean"), ("metrics", "instruction_loose_clean"),
           ("heldout", "loose"), ("degeneration", "words_median"), ("degeneration", "loop_rate"),
           ("degeneration", "echo_rate"),
           ("degeneration", "lowercase_rate"), ("degeneration", "no_comma_rate"), ("degeneration", "format_rate"),
           ("degeneration", "bullets_rate"), ("degeneration", "fewshot_rate"))


def ci_table(arm_dirs: dict[str, Path], heldout: list[str], against: str = "base") -> str:
    """Each arm against ``against`` (the untrained ``base``, or another arm to choose between two recipes): the
    value, the change and its 95% paired bootstrap interval (:func:`eval.report.compare`; on the own suite it
    resamples whole seed tasks, since a task's variants are not independent). An arm's change is worth reading
    only where its interval excludes 0."""
    from eval.report import compare

    if against not in arm_dirs:
        return f"(no {against} arm: no intervals)"
    head = "| arm | " + " | ".join(("heldout_loose" if s == "heldout" else k) for s, k in CI_KEYS) + " |"
    lines = [head, "|---" * (len(CI_KEYS) + 1) + "|"]
    by = ""
    for arm, d in arm_dirs.items():
        if arm == against:
            continue
        c = compare(arm_dirs[against], d, heldout_types=heldout)
        by = f"{c['n_paired']} prompts, resampled by {c.get('resampled', 'prompt')} ({c.get('n_groups')} groups)"
        cells = []
        for sect, k in CI_KEYS:
            v = c[sect][k]
            fmt = ".0f" if k == "words_median" else ".3f"
            if v["b"] is None or v["delta"] is None:
                cells.append("n/a")
                continue
            ci = f" [{v['ci95'][0]:+{fmt}}, {v['ci95'][1]:+{fmt}}]" if v["ci95"] else ""
            cells.append(f"{v['b']:{fmt}} ({v['delta']:+{fmt}}{ci}){' *' if v['significant'] else ''}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return f"\nchange against {against}, 95% paired bootstrap interval; * = excludes 0; {by}\n" + "\n".join(lines)


def report(dirs: list[Path], heldout: list[str], suite_items: list[dict] | None, against: str = "base") -> None:
    """``--report``: the interval table over the arms of one or more probe output dirs. Results written by a
    probe before rows carried ``task_id`` or ``echo`` get them from the suite, by key (an echo makes the answer
    degenerate: the clean metrics are then recomputed)."""
    from eval.degeneration import is_echo

    arm_dirs: dict[str, Path] = {}
    by_key = {it["key"]: it for it in suite_items or ()}
    for d in dirs:
        for res in sorted(d.glob("*/results.jsonl")):
            rows = [json.loads(x) for x in res.read_text().splitlines() if x.strip()]
            new = []
            for r in rows:
                it = by_key.get(r["key"])
                if it is not None and "task_id" not in r and it.get("task_id"):
                    r = {**r, "task_id": it["task_id"]}
                if it is not None and "echo" not in r:
                    echo = is_echo(r["response"], it["prompt"], it.get("kwargs"))
                    r = {**r, "echo": echo, "degenerate": bool(r.get("degenerate")) or echo}
                new.append(r)
            if new != rows:
                from shared.atomic import atomic_write_text

                atomic_write_text(res, "".join(json.dumps(r) + "\n" for r in new))
            arm_dirs.setdefault(res.parent.name, res.parent)
    print(ci_table(dict(sorted(arm_dirs.items(), key=lambda kv: kv[0] != against)), heldout, against))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=Path, help="a built round's pairs dir (shards + extras.parquet); not with --report")
    ap.add_argument("--config", default="configs/base-gpu.yaml", help="its train settings are the arms' recipe")
    ap.add_argument("--base", default="gemma3-270m")
    ap.add_argument("--arms", default=",".join(ARMS), help="built-in arms, comma-separated ('' for none)")
    ap.add_argument("--arm", action="append", default=[], metavar='"NAME SOURCE[+MOD...] [key=value ...]"',
                    help="an arm of your own (repeatable; see the module doc)")
    ap.add_argument("--suite", choices=["own", "ifeval"], default="own",
                    help="own: a development suite (held-out seed tasks x --variants draws); ifeval: the 541 prompts")
    ap.add_argument("--variants", type=int, default=12, help="constraint draws per held-out seed task (--suite own)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N prompts")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("runs/length_probe"))
    ap.add_argument("--report", type=Path, nargs="+", metavar="DIR",
                    help="no training: the interval table of earlier probes' output dirs (their arms, against base)")
    ap.add_argument("--against", default="base", metavar="ARM",
                    help="the arm every other is compared with (default base; another arm to choose between recipes)")
    ap.add_argument("overrides", nargs="*", help="config overrides for every trained arm (key=value)")
    args = ap.parse_args()
    if args.report:
        from eval.constraints import own_suite
        from eval.ifeval import load_ifeval_prompts
        from shared.config import load_config

        report(args.report, load_config(args.config, []).eval.heldout_types,
               own_suite(variants=args.variants) if args.suite == "own" else load_ifeval_prompts(), args.against)
        return 0
    if args.pairs is None:
        ap.error("--pairs is required (or --report DIR... for the table of earlier probes)")
    names = [a for a in args.arms.split(",") if a]
    if bad := [a for a in names if a not in ARMS]:
        ap.error(f"unknown arm(s) {bad}; known: {', '.join(ARMS)}")
    arms: dict[str, list[str]] = {a: ([] if a == "base" else BUILT_IN[a].split()) for a in names}
    for spec in args.arm:
        name, *recipe = spec.split()
        if not recipe or name in arms:
            ap.error(f"--arm {spec!r}: give a new NAME, then a SOURCE (built, cut, checker[+MOD...]) and overrides")
        arms[name] = recipe

    import pandas as pd
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.constraints import own_suite
    from eval.ifeval import load_ifeval_prompts
    from eval.run import score_responses
    from gen_server.models import resolve_model
    from pair_builder.extras import EXTRAS_FILE
    from shared.atomic import atomic_write_json, atomic_write_text
    from shared.config import load_config
    from shared.prompting import load_template

    base = resolve_model(args.base)
    tpl = load_template()
    if args.suite == "ifeval":
        items = load_ifeval_prompts(args.limit)
    else:
        items = own_suite(variants=args.variants)[:args.limit]
    prompts = [tpl.render(it["prompt"]) for it in items]
    stops = [*tpl.stop]
    tok = AutoTokenizer.from_pretrained(base)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    heldout = load_config(args.config, []).eval.heldout_types
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}

    def score(arm: str, model, info: dict) -> None:
        t0 = time.monotonic()
        raw = generate(model.to(device).eval(), tok, prompts, max_new_tokens=args.max_new_tokens, batch=args.batch,
                       stops=stops)
        rows, scores = score_responses(items, raw, tpl, heldout_types=heldout)
        (args.out / arm).mkdir(exist_ok=True)
        atomic_write_text(args.out / arm / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        results[arm] = {**info, "generate_s": round(time.monotonic() - t0, 1), **_summary(scores)}
        print(f"{arm}: {json.dumps(results[arm])}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for arm, recipe in arms.items():
            if arm == "base":
                score(arm, AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), {"pairs": 0})
                continue
            over = [f"run.root={Path(tmp) / arm}", "run.name=run", f"train.base_model={base}", "train.report_to=[]",
                    *args.overrides, *recipe[1:]]
            cfg = load_config(args.config, over)
            checker, extras = arm_pairs(args.pairs, recipe[0], cfg.pairs)
            pairs = Path(tmp) / arm / "run" / "round-0" / "pairs"
            pairs.mkdir(parents=True)
            pd.DataFrame(checker).to_parquet(pairs / "shard-00000.parquet")
            if extras:
                pd.DataFrame(extras).to_parquet(pairs / EXTRAS_FILE)
            t0 = time.monotonic()
            res = importlib.import_module(f"trainer.{cfg.train.method}").train(cfg)  # the arm's recipe
            train_s = time.monotonic() - t0
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                              res.adapter_dir).merge_and_unload()
            kinds = Counter(r["principle_id"] for r in extras)
            score(arm, model, {"recipe": " ".join(recipe), "method": cfg.train.method,
                               "pairs": len(checker) + len(extras),
                               "stop_pairs": kinds["stop"], "repair_pairs": kinds["repair"],
                               "steps": res.global_step, "train_s": round(train_s, 1)})
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    atomic_write_json(args.out / "probe.json", {"pairs": str(args.pairs), "config": args.config, "suite": args.suite,
                                                "prompts": len(items),
                                                "overrides": args.overrides, "arms": results})
    print(ci_table({arm: args.out / arm for arm in results}, heldout, args.against))
    return 0


if __name__ == "__main__":
    sys.exit(main())
