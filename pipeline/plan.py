"""Price a run before it starts: per stage and per round, time, GPU memory, host RAM, disk and dollars.

    python -m pipeline plan --config CFG [--rounds N] [--shape qwen2.5-32b]

Every figure is a measurement of this project scaled to the run's model, card and counts, and each line says
which measurement it comes from (:data:`MEASURED`, all in docs/benchmarks.md unless marked *assumed*). The
scalings are first-order: decoding and training time grow with the parameter count above the measured
shape (and do not shrink below it: small models are bound by overheads), and change with the card by the
ratio of its memory bandwidth (decoding) or bf16 compute (training) to the H200's, on which everything was
measured. A figure scaled far from its measurement (7B to 32B, H200 to A100) is an estimate, and says so.

The plan refuses (``fits: no``, exit 1) when a stage cannot fit the card, and names the fix; a run priced past
``cost.budget_usd`` is flagged (it stops cleanly at the budget). ``pipeline run`` plans first when ``cost.gpu``
is set, and refuses a run that does not fit (exit 2) before any server starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import Config

GIB = 2**30


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float  # what the driver reports as total
    bf16_tflops: float  # dense, published
    hbm_tb_s: float  # published


CARDS = {
    "h200": Card("NVIDIA H200 141GB", 139.8, 989.0, 4.8),
    "h100-80gb": Card("NVIDIA H100 SXM 80GB", 79.6, 989.0, 3.35),
    "a100-80gb": Card("NVIDIA A100 SXM 80GB", 79.3, 312.0, 2.04),
}
MEASURED_ON = "h200"


@dataclass(frozen=True)
class Point:
    value: float
    source: str


# What the plan is calibrated on. Completion tokens per second are whole-stage rates (requests, client and
# server overhead included), so they price a stage, not a kernel.
MEASURED = {
    # decoding, bf16 + CUDA graphs, 7.6B params (Qwen2.5-7B shape), 512 prompts in flight, 256 tokens each
    "decode_7b": Point(27_721.0, "7B-shape server + eval client, 27,721 output tok/s (2026-11-27, H200)"),
    # small models served eagerly in float32 (configs/base-gpu.yaml): eval and pair-building stage rates
    "decode_small_eager_eval": Point(116_000 / 48.5, "gemma3-270m eval, 116k tokens in 48 s (run 4, H200)"),
    "decode_small_eager_pairs": Point(1_030_000 / 219.0, "gemma3-270m pairs, 1.03M tokens in 219 s (run 4, H200)"),
    # small model with CUDA graphs (configs/demo-gpu.yaml)
    "decode_small_graphs_eval": Point(63_119 / 10.6, "smollm2-135m eval, 63k tokens in 10.6 s (2026-11-27, H200)"),
    "decode_small_graphs_pairs": Point(962_000 / 34.0, "smollm2-135m pairs, 962k tokens in 34 s (2026-11-27, H200)"),
    # training tokens per second x parameters, 7.6B shape, 4-bit base, LoRA r=64, rows ~750 tokens
    "train_unsloth_ref": Point(7.29 * 1500 * 7.6e9, "unsloth 7B, reference log-probs supplied: 7.29 pairs/s"),
    "train_unsloth": Point(4.88 * 1500 * 7.6e9, "unsloth 7B, reference pass online: 4.88 pairs/s"),
    "train_peft": Point(2.71 * 1500 * 7.6e9, "peft 7B, reference pass online: 2.71 pairs/s"),
    "train_small": Point(938 / 32.5, "gemma3-270m peft, 938 pair passes in 32.5 s (run 4, H200)"),
    "train_load_small": Point(53.0, "gemma3-270m trainer start-up, 53 s of its 85 s process (run 4)"),
    "serve_start_small": Point(128.0, "vLLM start, gemma3-270m eager 128 s, smollm2-135m with graphs 126 s"),
    "merge_small": Point(25.0, "float32 merge + check of gemma3-270m, 25 s (runs 3 and 4)"),
    # yields of pair building and eval on a base model (run 4, gemma3-270m; a larger model keeps more)
    "eval_fill": Point(115_677 / (541 * 512), "base-model eval answers fill 42% of max_tokens (run 4)"),
    "pairs_fill": Point(1_030_000 / 2268 / (5 * 384 + 160), "pair requests fill 22% of their token caps (run 4)"),
    "acceptance": Point(241 / 2268, "10.6% of instructions give a checker pair (run 4)"),
    "replica_scaling": Point(3.88 / 4, "pair_builder over 4 simulated servers: 3.88x (CPU bench)"),
    "pair_bytes": Point(230e3 / 373, "pairs on disk: 0.6 KB a pair, parquet (run 4)"),
    "candidate_bytes": Point(10.8e6 / 2268, "pairs.record_candidates: 4.8 KB an instruction (run 4)"),
    "self_instruct_keep": Point(252 / 256, "252 of 256 self-instruct tasks survive dedupe (run 4)"),
    # assumed, not measured on these machines
    "disk_gb_s": Point(1.0, "*assumed*: 1 GB/s to read or write model weights"),
    "host_ram_train_gib": Point(8.0, "*assumed*: 8 GiB of host RAM besides one 5 GB weight shard while loading"),
    "host_ram_serve_gib": Point(4.0, "*assumed*: 4 GiB of host RAM for a server process (weights are mmapped)"),
}


@dataclass
class Stage:
    name: str
    seconds: float
    gpu_gib: float | None
    host_gib: float
    disk_gib: float
    sources: list[str] = field(default_factory=list)


@dataclass
class Plan:
    model: str
    params: float
    card: Card | None
    stages: list[Stage]  # one round (round 0 includes its base eval; every round ends with the next eval)
    rounds: int
    usd_per_hour: float
    budget_usd: float | None
    problems: list[str] = field(default_factory=list)  # what cannot fit the card: the run would fail
    warnings: list[str] = field(default_factory=list)  # what goes past the budget: the run stops there, cleanly

    @property
    def round_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def total_seconds(self) -> float:
        return self.round_seconds * self.rounds

    @property
    def total_usd(self) -> float:
        return self.total_seconds / 3600.0 * self.usd_per_hour

    @property
    def fits(self) -> bool:
        return not self.problems


def _instructions(cfg: Config) -> int:
    from shared.tasks import load_tasks, split_of

    p = cfg.pairs
    n = 0
    if "seed" in p.sources:
        n += sum(split_of(t["id"]) == "train" for t in load_tasks(p.seed_tasks)) * p.seed_variants
    if "self_instruct" in p.sources:
        n += round(p.self_instruct_tasks * MEASURED["self_instruct_keep"].value)
    if "file" in p.sources and p.input_file and Path(p.input_file).is_file():
        n += sum(1 for line in Path(p.input_file).read_text().splitlines() if line.strip())
    if p.max_instructions:
        n = min(n, p.max_instructions)
    if p.max_pairs:  # pair building stops once max_pairs are kept
        n = min(n, math.ceil(p.max_pairs / MEASURED["acceptance"].value))
    return n


def _decode_rate(params: float, card: Card | None, eager: bool, stage: str) -> tuple[float, list[str]]:
    """Completion tokens/s of a whole eval or pairs stage."""
    if params < 2e9:  # overhead-bound: the small-model stage rates as measured
        key = f"decode_small_{'eager' if eager else 'graphs'}_{stage}"
        rate, src = MEASURED[key].value, [MEASURED[key].source]
    else:
        m = MEASURED["decode_7b"]
        rate, src = m.value * min(1.0, 7.6e9 / params), [m.source + (
            f"; x {7.6e9 / params:.2f} for {params / 1e9:.1f}B params (*scaled*)" if params > 7.6e9 else "")]
    if card is not None and card is not CARDS[MEASURED_ON]:
        f = card.hbm_tb_s / CARDS[MEASURED_ON].hbm_tb_s
        rate *= f
        src.append(f"x {f:.2f} memory bandwidth of {card.name} vs H200 (*scaled*)")
    return rate, src


def plan(cfg: Config, shape: Any, *, rounds: int | None = None, model: str = "") -> Plan:
    """The run's plan for ``shape`` (a ``trainer.plan.ModelShape``) on ``cost.gpu``."""
    from trainer.plan import _estimate_for, largest_fitting_batch, planned_backend

    card = CARDS.get(cfg.cost.gpu) if cfg.cost.gpu else None
    rounds = rounds or cfg.pipeline.rounds
    params = shape.params
    eager = "--enforce-eager" in cfg.server.extra_args
    serve_bytes = params * (4 if cfg.server.dtype == "float32" else 1 if cfg.server.quantization == "fp8" else 2)
    disk = MEASURED["disk_gb_s"]
    p, t, ev = cfg.pairs, cfg.train, cfg.eval
    stages: list[Stage] = []
    problems: list[str] = []

    # serve: start (load + compile) and hold gpu_memory_utilization of the card
    start = MEASURED["serve_start_small"].value + serve_bytes / 1e9 / disk.value
    gpu = card.memory_gib * cfg.server.gpu_memory_utilization if card else None
    host_serve = MEASURED["host_ram_serve_gib"]
    stages.append(Stage("serve start", start, gpu, host_serve.value, 0.0,
                        [MEASURED["serve_start_small"].source, f"+ {serve_bytes / 1e9:.1f} GB of weights at "
                         f"{disk.source}", f"GPU: server.gpu_memory_utilization of the card; {host_serve.source}"]))
    if card and serve_bytes / GIB > gpu * 0.9:
        problems.append(f"serve: {serve_bytes / GIB:.0f} GiB of weights in {gpu:.0f} GiB "
                        f"(server.gpu_memory_utilization={cfg.server.gpu_memory_utilization} of {card.name}): "
                        "set server.quantization=fp8, or server.tensor_parallel_size across GPUs")

    # eval: the suite's prompts at eval.max_tokens
    if ev.suite == "ifeval":
        prompts = 541
    else:
        from eval.constraints import own_suite

        prompts = len(own_suite())  # what `eval` scores for suite own
    prompts = min(prompts, ev.limit or prompts)
    tokens = prompts * ev.max_tokens * MEASURED["eval_fill"].value
    # the eval spreads over server.replicas too, but its scaling is not measured: planned on one (an upper bound)
    rate, src = _decode_rate(params, card, eager, "eval")
    stages.append(Stage("eval", tokens / rate, gpu, host_serve.value, 0.0,
                        [f"{prompts} prompts x {ev.max_tokens} tokens x {MEASURED['eval_fill'].source}", *src]))

    # pairs: k samples and R critique-rewrite passes per instruction
    n = _instructions(cfg)
    tokens = n * ((p.k + p.revisions) * p.max_tokens + p.revisions * p.critique_max_tokens) \
        * MEASURED["pairs_fill"].value
    rate, src = _decode_rate(params, card, eager, "pairs")
    replicas = cfg.server.replicas if cfg.server.replicas != "auto" else 1
    if replicas > 1:
        rate *= replicas * MEASURED["replica_scaling"].value
        src.append(f"x {replicas} server.replicas at {MEASURED['replica_scaling'].source}")
    kept = n * MEASURED["acceptance"].value
    pairs = min(kept * (1 + p.stop_pairs + p.repair_pairs), p.max_pairs or math.inf)
    pdisk = pairs * MEASURED["pair_bytes"].value + (n * MEASURED["candidate_bytes"].value if p.record_candidates
                                                    else 0.0)
    stages.append(Stage("pairs", tokens / rate, gpu, host_serve.value + 2.0, pdisk / GIB,
                        [f"{n} instructions, {kept:.0f} checker pairs ({MEASURED['acceptance'].source}) + extras",
                         MEASURED["pairs_fill"].source, *src, MEASURED["pair_bytes"].source]))

    # train: the memory planner's peak; time from the measured tokens x params rates
    bs = t.per_device_train_batch_size
    batch = int(bs) if bs != "auto" else (largest_fitting_batch(cfg, shape=shape, gpu_gib=card.memory_gib)
                                          if card else 1) or 1
    backend = planned_backend(t.backend) if card else "peft"
    peak = _estimate_for(cfg, shape, batch, on_gpu=card is not None)["peak_gib"] if card else None
    row = min(t.max_length, 330 + p.max_tokens)  # template (~330 tokens) + a response
    passes = pairs * (1 - t.eval_split) * t.num_train_epochs
    if t.max_steps:
        passes = min(passes, t.max_steps * batch * t.gradient_accumulation_steps)
    if params < 2e9:
        secs = passes / MEASURED["train_small"].value
        src = [MEASURED["train_small"].source]
    else:
        key = "train_peft" if backend == "peft" else "train_unsloth_ref" if p.ref_logprobs else "train_unsloth"
        secs = passes * 2 * row / (MEASURED[key].value / params)  # measured tokens/s x params, over these params
        src = [MEASURED[key].source + f", scaled to {params / 1e9:.1f}B params (*scaled*)"]
    if t.method == "sft":
        secs /= 2  # one sequence per pair instead of two
        src.append("sft: half of DPO's tokens (one sequence per pair)")
    if card and card is not CARDS[MEASURED_ON]:
        f = card.bf16_tflops / CARDS[MEASURED_ON].bf16_tflops
        secs /= f
        src.append(f"/ {f:.2f} bf16 compute of {card.name} vs H200 (*scaled*)")
    load = MEASURED["train_load_small"].value + params * 2 / 1e9 / disk.value
    lora = _estimate_for(cfg, shape, 1, on_gpu=False)["lora_params_m"] * 1e6
    ckpt = lora * (4 + 8) * (t.save_total_limit or 3) / GIB  # adapter + optimizer states per checkpoint
    stages.append(Stage("train", secs + load, peak, MEASURED["host_ram_train_gib"].value + 5, ckpt,
                        [f"{passes:.0f} pair passes of ~{2 * row} tokens, {backend} backend, batch {batch}", *src,
                         f"+ {load:.0f} s start-up ({MEASURED['train_load_small'].source}; weights at "
                         f"{disk.source})"]))
    if card and peak is not None and peak > card.memory_gib:
        problems.append(f"train: peak {peak:.0f} GiB > {card.memory_gib:.0f} GiB ({card.name}): lower "
                        "train.per_device_train_batch_size or train.max_length, keep train.load_in_4bit=true, or "
                        "train.backend=unsloth (see `python -m trainer.plan`)")

    # merge: the 16-bit (or float32) model on the card, saved, reloaded to verify
    mbytes = params * (4 if cfg.merge.dtype == "float32" else 2)
    msecs = MEASURED["merge_small"].value + 3 * mbytes / 1e9 / disk.value
    mgpu = mbytes / GIB * 1.05 + 1.0 if card else None
    stages.append(Stage("merge", msecs, mgpu, mbytes / GIB, mbytes / GIB,
                        [MEASURED["merge_small"].source, f"+ 3 passes over {mbytes / 1e9:.1f} GB "
                         f"(load, save, reload) at {disk.source}", "GPU: the whole merged model, one copy at a "
                         "time (trainer/merge.py frees each before the next loads); host RAM: it loads on the "
                         "CPU first; disk: the merged model, kept for every round"]))
    if card and mgpu is not None and mgpu > card.memory_gib:
        problems.append(f"merge: {mgpu:.0f} GiB of {cfg.merge.dtype} weights > {card.memory_gib:.0f} GiB "
                        f"({card.name}): set merge.dtype=bfloat16 (half of float32), or merge on a larger card")

    # the next model is served and evaluated at the end of every round
    stages.append(Stage("serve + eval of the new model", stages[0].seconds + stages[1].seconds, gpu,
                        stages[0].host_gib, 0.0, ["as round 0's serve start and eval"]))

    pl = Plan(model or "model", params, card, stages, rounds, cfg.cost.gpu_usd_per_hour, cfg.cost.budget_usd,
              problems)
    if card and pl.budget_usd is not None and pl.total_usd > pl.budget_usd:
        pl.warnings.append(
            f"cost: {rounds} round(s) at ${pl.total_usd:.2f} > cost.budget_usd=${pl.budget_usd:.2f}; the run stops "
            f"cleanly at the budget, after about {pl.budget_usd / (pl.total_usd / rounds):.1f} round(s). For all of "
            "them: fewer pipeline.rounds, fewer instructions (pairs.seed_variants, pairs.self_instruct_tasks, "
            "pairs.max_pairs), or a larger budget")
    return pl


def render(pl: Plan) -> str:
    """The plan as a Markdown table, its sources, the totals and the verdict (last line ``fits: yes|no``)."""
    card = pl.card.name if pl.card else "no GPU (cost.gpu not set)"
    out = [f"# Plan: {pl.model} ({pl.params / 1e9:.2f}B params) on {card}, {pl.rounds} round(s)", ""]
    if pl.card is None:
        out += ["Times, GPU memory and dollars are calibrated on GPUs only: set cost.gpu to the card the run is for "
                "(a CPU run's round is measured in docs/benchmarks.md, 'The demo round').", ""]

    def dur(s: float) -> str:
        return _dur(s) if pl.card else "-"

    def usd(s: float) -> str:
        return f"${s / 3600 * pl.usd_per_hour:.2f}" if pl.card else "-"

    out += ["| stage | time | GPU memory | host RAM | disk | cost |", "|---|---|---|---|---|---|"]
    for s in pl.stages:
        gpu = f"{s.gpu_gib:.1f} GiB" if s.gpu_gib is not None else "-"
        out.append(f"| {s.name} | {dur(s.seconds)} | {gpu} | {s.host_gib:.1f} GiB | {s.disk_gib:.2f} GiB | "
                   f"{usd(s.seconds)} |")
    out.append(f"| **one round** | {dur(pl.round_seconds)} | {_max_gpu(pl)} | "
               f"{max(s.host_gib for s in pl.stages):.1f} GiB | {sum(s.disk_gib for s in pl.stages):.2f} GiB | "
               f"{usd(pl.round_seconds)} |")
    out.append(f"| **{pl.rounds} round(s)** | {dur(pl.total_seconds)} | | | "
               f"{sum(s.disk_gib for s in pl.stages) * pl.rounds:.2f} GiB | {usd(pl.total_seconds)} |")
    out += ["", "Where each figure comes from:"]
    for s in pl.stages:
        out.append(f"- {s.name}: " + "; ".join(s.sources))
    budget = f"${pl.budget_usd:.2f}" if pl.budget_usd is not None else "none set"
    out += ["", f"budget: {budget}; card: {card}"]
    out += [f"over budget: {w}" for w in pl.warnings]
    out += [f"does not fit: {p}" for p in pl.problems]
    out.append(f"fits: {'yes' if pl.fits else 'no'}")
    return "\n".join(out)


def _max_gpu(pl: Plan) -> str:
    gpus = [s.gpu_gib for s in pl.stages if s.gpu_gib is not None]
    return f"{max(gpus):.1f} GiB" if gpus else "-"


def _dur(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def shape_for(cfg: Config, name: str | None = None) -> tuple[Any, str]:
    """The base model's shape: a known shape by ``name``, else the model's config.json, else a known shape the
    model's name starts with (planning a GPU run from a laptop)."""
    from trainer.plan import KNOWN_SHAPES, ModelShape, _shape_of_config

    if name:
        return KNOWN_SHAPES[name], name
    if cfg.model.base in KNOWN_SHAPES:  # a packaged model: no need to prepare it to plan
        return KNOWN_SHAPES[cfg.model.base], cfg.model.base
    base = Path(cfg.model.base).expanduser()
    if (base / "config.json").is_file():
        return ModelShape.from_config(base / "config.json"), str(base)
    return _shape_of_config(cfg)


def refuse_unless_fits(cfg: Config) -> Plan | None:
    """What ``pipeline run`` does first: plan for ``cost.gpu`` (nothing when unset, or when the model's shape
    cannot be known here) and raise :class:`ConfigError` with the fixes when a stage cannot fit the card."""
    import logging

    from shared.config import ConfigError

    log = logging.getLogger("pipeline")
    if cfg.cost.gpu is None:
        return None
    try:
        shape, name = shape_for(cfg)
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        log.warning("no plan (the model's shape is unknown here: %s); the run goes on unplanned", e)
        return None
    pl = plan(cfg, shape, model=name)
    log.info("plan: %d round(s) of about %s on %s, $%.2f; peak GPU %s (python -m pipeline plan --config CFG for "
             "every stage)", pl.rounds, _dur(pl.round_seconds), pl.card.name if pl.card else "-", pl.total_usd,
             _max_gpu(pl))
    for w in pl.warnings:
        log.warning("%s", w)
    if pl.problems:
        raise ConfigError([f"does not fit: {p}" for p in pl.problems], "pipeline plan")
    return pl
