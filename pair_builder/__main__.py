"""Build verified preference pairs with Ray actors against one or more generation servers.

    # a head started in the repo with `ray start --head` (the job runs in the head's working dir):
    ray job submit --address http://127.0.0.1:8265 -- python -m pair_builder --config CFG
    # a remote cluster (cluster.yaml): ship the code, not the venv
    ray job submit --address http://127.0.0.1:8265 --runtime-env-json \
        '{"working_dir": ".", "excludes": [".venv", ".git", "runs"]}' -- python -m pair_builder --config CFG
    # in-process Ray, CPU demo:
    python -m pair_builder --config CFG pairs.servers='[http://127.0.0.1:8000]' pairs.max_pairs=16

Order: validate everything (config, constitution, template, instruction files) -> check the servers ->
open ``RUN/round-K/pairs`` (refuse one made under other settings) -> instructions (reused from an earlier
submission of the same config) -> dedupe -> fan items out over actors -> the driver writes shards and the
done log -> stats, plots, dataset card. Resubmitting skips every finished item and writes no pair twice.
Exit codes: 0 ok, 2 bad config or output dir, 3 server problem, 4 items failed (resubmit to retry them).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from eval.degeneration import fewshot_words
from pair_builder.actors import Job, init_ray, run_jobs, start_workers
from pair_builder.build import BuildSettings, item_id, principle_for
from pair_builder.extras import extras_summary, select_extras, write_extras
from pair_builder.report import write_report
from pair_builder.sample import SamplingSettings
from pair_builder.settings import check_config, connect
from pair_builder.sources import (
    Instruction,
    constrain_tasks,
    dedupe,
    diversity_summary,
    file_instructions,
    seed_instructions,
    self_instruct_examples,
)
from pair_builder.verify import Bands, Relevance
from pair_builder.writer import OutputMismatch, PairWriter
from shared.atomic import atomic_write_json, atomic_write_text, read_jsonl
from shared.client import ServerUnavailable
from shared.config import Config, ConfigError, add_config_args, config_from_args
from shared.ledger import CostLedger
from shared.log import setup_logging
from shared.modeldir import eos_token
from shared.procs import kill_own_group, supervised
from shared.records import content_hash
from shared.rundir import RunDir

log = logging.getLogger("pair_builder")

TASKS_PER_COMPLETION = 4  # what a self-instruct completion yields after filtering, roughly (sizes requests)
SELF_INSTRUCT_N = 4  # completions per self-instruct request (one prompt, n samples)
SELF_INSTRUCT_MAX_TOKENS = 200  # ~5 task lines


def build_settings(cfg: Config, model: str, revision: str, eos_token: str | None = None) -> BuildSettings:
    p = cfg.pairs
    return BuildSettings(
        model=model, model_revision=revision, round=p.round,
        sampling=SamplingSettings(k=p.k, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                  revisions=p.revisions, critique_max_tokens=p.critique_max_tokens,
                                  critique_temperature=p.critique_temperature, seed=p.seed),
        bands=Bands(min_chars=p.min_chars, max_chars=p.max_chars, max_length_ratio=p.max_length_ratio,
                    min_edit_distance=p.min_edit_distance, max_edit_distance=p.max_edit_distance),
        no_constraint_rule=p.no_constraint_rule, ref_logprobs=p.ref_logprobs, eos_token=eos_token,
        record_candidates=p.record_candidates, pair_rule=p.pair_rule, copy_span=p.copy_span,
        rule_out_looping=p.rule_out_looping, relevance=Relevance(min_overlap=p.min_task_overlap, min_pmi=p.min_pmi),
        drop_unrequested_habits=p.drop_unrequested_habits, stop_pairs=p.stop_pairs > 0,
        habit_contrast=p.habit_contrast > 0, repair=p.repair_pairs > 0,
        no_repair=tuple(cfg.eval.heldout_types),
    )


def _self_instruct(cfg: Config, workers: list[Any], usage: dict[str, int]) -> list[str]:
    """Ask the model for new tasks until pairs.self_instruct_tasks are collected (at most 3 rounds)."""
    from shared.tasks import load_tasks, split_of

    p = cfg.pairs
    pool = [t["task"] for t in load_tasks(p.seed_tasks) if split_of(t["id"]) == "train"]
    tasks: list[str] = []
    request_index = 0

    def collect(job: Job, res: dict[str, Any]) -> None:
        if res.get("error"):
            return
        tasks.extend(res["tasks"])
        for k, v in res["usage"].items():
            usage[k] = usage.get(k, 0) + v

    for _ in range(3):
        missing = p.self_instruct_tasks - len(tasks)
        if missing <= 0:
            break
        jobs = []
        for _ in range(math.ceil(missing / (SELF_INSTRUCT_N * TASKS_PER_COMPLETION))):
            ex = self_instruct_examples(pool, p.self_instruct_shots, request_index, p.seed)
            jobs.append(Job("write_tasks", (ex, SELF_INSTRUCT_N, p.seed + request_index, SELF_INSTRUCT_MAX_TOKENS),
                            f"self-instruct-{request_index}"))
            request_index += 1
        before = len(tasks)
        run_jobs(workers, jobs, in_flight=p.in_flight_per_server, on_result=collect)
        if len(tasks) == before:
            log.warning("self-instruct: a round of %d request(s) gave no usable task; the model does not continue "
                        "the task list (see sources.parse_tasks for the filter) - stopping", len(jobs))
            break
    log.info("self-instruct: %d tasks from %d requests", len(tasks), request_index)
    return tasks[: p.self_instruct_tasks]


def gather_instructions(cfg: Config, workers: list[Any], meta: Path, usage: dict[str, int]) -> list[Instruction]:
    """All sources -> dedupe; saved per source config, so a resubmission asks the same instructions."""
    from shared.tasks import load_tasks, split_of

    p = cfg.pairs
    held = list(cfg.eval.heldout_types)  # instruction types the eval holds out: never drawn for pairs
    key = content_hash(p.sources, str(p.seed_tasks), p.seed_variants, p.max_constraints, p.self_instruct_tasks,
                       p.self_instruct_shots, str(p.input_file), p.dedupe_threshold, p.seed, sorted(held))[:12]
    path = meta / f"instructions-{key}.jsonl"
    if path.exists():
        instructions = [Instruction.from_json(d) for d in read_jsonl(path)]
        log.info("reusing %d instructions from %s", len(instructions), path)
        return instructions
    raw: list[Instruction] = []
    if "seed" in p.sources:
        raw += seed_instructions(seed=p.seed, variants=p.seed_variants, max_constraints=p.max_constraints,
                                 tasks_path=p.seed_tasks, exclude=held)
    if "file" in p.sources:
        raw += file_instructions(p.input_file)
    if "self_instruct" in p.sources:
        raw += constrain_tasks(_self_instruct(cfg, workers, usage), seed=p.seed, max_constraints=p.max_constraints,
                               source="self_instruct", exclude=held)
    heldout = [t["task"] for t in load_tasks(p.seed_tasks) if split_of(t["id"]) == "heldout"]
    instructions, report = dedupe(raw, threshold=p.dedupe_threshold, blocklist=heldout)
    diversity = diversity_summary(instructions)
    diversity["dedupe"] = {"before": len(raw), "exact": report.exact, "near": report.near,
                           "near_heldout": report.heldout, "examples": report.examples[:20]}
    atomic_write_json(meta / "diversity.json", diversity)
    atomic_write_text(path, "".join(json.dumps(i.to_json()) + "\n" for i in instructions))
    return instructions


class Progress:
    """Live progress: accepted pairs/s, tokens/s, acceptance rate, ETA (tqdm), cost so far."""

    def __init__(self, total: int, enabled: bool, stage: Any) -> None:
        self.bar = tqdm(total=total, unit="item", disable=not enabled, mininterval=1.0, dynamic_ncols=True)
        self.stage = stage
        self.start = time.monotonic()
        self.kept = self.done = self.tokens = 0

    def update(self, result: dict[str, Any]) -> None:
        u = result.get("usage") or {}
        self.tokens += u.get("prompt_tokens", 0) + u.get("completion_tokens", 0)
        self.stage.add(prompt_tokens=u.get("prompt_tokens", 0), completion_tokens=u.get("completion_tokens", 0),
                       requests=u.get("requests", 0))
        self.done += 1
        if result.get("kept"):
            self.kept += 1
            self.stage.add(accepted_pairs=1)
        dt = max(time.monotonic() - self.start, 1e-6)
        self.bar.set_postfix_str(f"pairs/s={self.kept / dt:.2f} tok/s={self.tokens / dt:.0f} "
                                 f"accept={self.kept / self.done:.0%} cost=${self.stage.cost_so_far:.4f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run(cfg: Config) -> int:
    p = cfg.pairs
    checked = check_config(cfg)
    served = connect(checked.servers, checked.api_key, model=p.model, revision=p.model_revision,
                     health_timeout=p.health_timeout_s, probe_logprobs=p.ref_logprobs or p.min_pmi is not None)
    eos = p.eos_token or eos_token(served.root)
    if p.ref_logprobs and eos is None:
        raise ConfigError([f"pairs.eos_token: the served model dir {served.root} is not readable here, so its eos "
                           f"token is unknown; set pairs.eos_token (e.g. '<|endoftext|>') or pairs.ref_logprobs=false"])
    settings = build_settings(cfg, served.name, served.revision, eos)
    rd = RunDir.from_config(cfg).round(p.round)
    manifest = {"model": served.name, "model_revision": served.revision,
                "constitution_sha256": checked.constitution.sha256, "template_sha256": checked.template.sha256,
                "sampling": settings.id_settings(checked.template), "round": p.round}
    writer = PairWriter(rd.pairs, manifest, shard_size=p.shard_size, ref_logprobs=p.ref_logprobs)
    log.info("model %s (%s), %d server(s), output %s, %d items already done",
             served.name, served.revision, len(checked.servers), rd.pairs, len(writer.done))

    started_ray = not ray.is_initialized()
    if started_ray:
        init_ray(p.ray_address)
    ledger = CostLedger(rd.ledger, cfg.cost.gpu_usd_per_hour)
    failures = 0
    try:
        with ledger.stage("pairs", round=p.round, servers=len(checked.servers)) as stage:
            workers = start_workers(checked.servers, checked.api_key, in_flight=p.in_flight_per_server,
                                    max_restarts=p.actor_max_restarts, timeout=cfg.client.timeout_s,
                                    max_retries=cfg.client.max_retries, settings=settings,
                                    template=checked.template, constitution=checked.constitution)
            si_usage: dict[str, int] = {}
            instructions = gather_instructions(cfg, workers, writer.meta, si_usage)
            stage.add(**si_usage)
            if p.max_instructions:
                instructions = instructions[: p.max_instructions]
            if not instructions:
                raise ConfigError(["no instructions left after dedupe; check pairs.sources and the input files"],
                                  "pairs config")
            # the example words that are rare among this round's instructions (few-shot talk, verify.scaffolding_problem)
            rare = sorted(fewshot_words(checked.template.example_texts(), [i.text for i in instructions])
                          ) if p.rule_out_fewshot else []
            jobs = []
            for ins in instructions:
                pr = principle_for(ins, checked.constitution, p.seed)
                iid = item_id(ins, pr.id, settings, checked.template)
                if not writer.is_done(iid):
                    jobs.append(Job("build", (ins.to_json(), pr.id, rare), iid))
            log.info("%d instructions, %d to do", len(instructions), len(jobs))
            budget = cfg.cost.budget_usd
            spent_before = RunDir.from_config(cfg).spent_usd()  # every round's: the budget covers the whole run

            def should_stop() -> bool:
                if p.max_pairs is not None and writer.kept_count >= p.max_pairs:
                    return True
                return budget is not None and spent_before + stage.cost_so_far >= budget

            progress = Progress(len(jobs), p.progress, stage)

            def on_result(job: Job, result: dict[str, Any]) -> None:
                writer.add(result)
                progress.update(result)

            try:
                failures = run_jobs(workers, jobs, in_flight=p.in_flight_per_server, on_result=on_result,
                                    should_stop=should_stop, stall_timeout=cfg.client.stall_timeout_s,
                                    servers=", ".join(checked.servers))
            finally:
                writer.flush()
                progress.close()
        entries = list(writer.done.values())
        records = writer.records()
        extras = select_extras(entries, records, habit_contrast=p.habit_contrast, stop_pairs=p.stop_pairs,
                               seed=p.seed, incidental_weight=p.incidental_habit_weight, repair_pairs=p.repair_pairs)
        write_extras(rd.pairs, extras, writer.schema)
        info = {
            "run": cfg.run.name, "round": p.round, "model": served.name, "model_revision": served.revision,
            "constitution": str(checked.constitution.source), "constitution_sha256": checked.constitution.sha256,
            "principles": len(checked.constitution.principles), "template_id": checked.template.id,
            "template_sha256": checked.template.sha256, "sampling": settings.sampling.as_dict(),
            "no_constraint_rule": p.no_constraint_rule, "ref_logprobs": p.ref_logprobs,
            "filters": {"pair_rule": p.pair_rule, "copy_span": p.copy_span, "rule_out_looping": p.rule_out_looping,
                        "rule_out_fewshot": p.rule_out_fewshot,
                        "min_task_overlap": p.min_task_overlap, "min_pmi": p.min_pmi,
                        "max_edit_distance": p.max_edit_distance, "drop_unrequested_habits": p.drop_unrequested_habits},
            "extras": extras_summary(entries, records, extras, habit_contrast=p.habit_contrast,
                                     stop_pairs=p.stop_pairs, incidental_weight=p.incidental_habit_weight,
                                     repair_pairs=p.repair_pairs),
            "servers": ", ".join(checked.servers), "instructions": len(instructions),
            "sources": ", ".join(p.sources), "usd_per_hour": cfg.cost.gpu_usd_per_hour,
            "cost_usd": ledger.totals().get("pairs", {}).get("cost_usd", 0.0),  # every submission's pairs stage
        }
        kept = sum(1 for e in entries if e.get("kept"))
        info["cost_per_pair"] = info["cost_usd"] / kept if kept else 0.0
        stats = write_report(rd.pairs, writer.meta, entries, info,
                             [len(i.task.split()) for i in instructions], template=checked.template,
                             constitution=checked.constitution, audit_sample=p.audit_sample)
    finally:
        if started_ray:
            ray.shutdown()
    not_done = sum(1 for j in jobs if not writer.is_done(j.key))
    log.info("done: %d pairs kept of %d items; drops %s; %d item(s) not finished",
             stats["kept"], stats["items_done"], stats["drop_reasons"], not_done)
    if failures or (not_done and not should_stop()):
        log.error("%d item(s) failed (see warnings above); resubmit the same command to retry only those", not_done)
        return 4
    return 0


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through run()'s finally: the shard flushed, Ray shut down


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pair_builder", description=__doc__.split("\n")[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    if argv is None:  # the command line: the work runs in a supervised child (shared.procs.supervised)
        rc = supervised("pair_builder", sys.argv[1:])
        if rc is not None:
            return rc
        signal.signal(signal.SIGTERM, _terminated)
        try:
            return _main(args)
        finally:
            kill_own_group()  # this child leads its group: whatever Ray left in it goes with it
    return _main(args)


def _main(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        cfg = config_from_args(args)
        return run(cfg)
    except (ConfigError, OutputMismatch) as e:
        log.error("%s", e)
        return 2
    except ServerUnavailable as e:
        log.error("%s", e)
        return 3
    except OSError as e:  # disk full, permissions: what was written before is intact (atomic writes)
        log.error("could not write %s: %s. Free space (or fix the permissions), then resubmit: finished items are "
                  "kept and only the rest is redone", e.filename or "the output", e.strerror or e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
