"""The steps every training recipe of one round shares, in the order a recipe calls them:

1. :func:`prepare`: the backend, the round's paths, the pairs validated and split, before any model loads;
2. :func:`load_policy`: the base with its LoRA (round k>0 continues round k-1's adapter);
3. :func:`callbacks`: NaN guard, cost budget, checkpoint markers, step timing, early stopping;
4. :func:`fit`: train (resuming from the last complete checkpoint), recorded in the round's cost ledger;
5. :func:`save_adapter`: the adapter and its summary, atomically.

A recipe (``trainer.dpo``, ``trainer.sft``; ``train.method`` picks it and the pipeline runs
``python -m trainer.<method>``) builds its TRL config and trainer between 3 and 4, and its CLI with :func:`cli`.
Every recipe writes a LoRA adapter to ``round-k/adapter``, so the merge and the next round do not care which ran.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.atomic import atomic_dir, atomic_write_json
from shared.config import Config, ConfigError, add_config_args, config_from_args
from shared.ledger import CostLedger
from shared.rundir import RunDir
from trainer.artifacts import SUMMARY_NAME, RefLogpsMismatch, TrainingDiverged, TrainResult, base_fingerprint
from trainer.curves import write_curves
from trainer.data import PairsDataError, load_pairs, split_eval, validate_pairs
from trainer.models import (
    check_init_adapter,
    continue_adapter,
    kl_to_base,
    load_peft,
    load_unsloth,
    lora_config,
    oom_message,
    pick_backend,
    resolve_batch_size,
)
from trainer.paths import TrainPaths, resolve_train_paths

log = logging.getLogger(__name__)


@dataclass
class Round:
    """One round's training inputs, checked: what :func:`prepare` returns."""

    cfg: Config
    backend: str
    paths: TrainPaths
    template: Any
    tokenizer: Any
    train: Any  # datasets.Dataset: the pairs, all columns
    eval: Any | None
    batch_size: int


@dataclass
class Policy:
    model: Any
    tokenizer: Any
    peft_config: Any | None  # None when the model is already wrapped (Unsloth, or a continued adapter)
    start_kl: float


@dataclass
class Callbacks:
    nan_guard: Any
    cost: Any
    speed: Any
    early: Any | None
    all: list[Any] = field(default_factory=list)


def _check_trackers(report_to: list[str]) -> None:
    """Fail before any model loads when a configured tracker is not installed."""
    import importlib.util

    modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    missing = [name for name in report_to
               if name in modules and not any(importlib.util.find_spec(m) for m in modules[name])]
    if missing:
        raise ConfigError([f"train.report_to: {', '.join(missing)} not installed; `pip install {' '.join(missing)}` "
                           "or drop it (train.report_to=[])"])


class GPUBusy(MemoryError):
    """The GPU does not have the memory training needs free; the message names who holds it."""


def _gpu_holders() -> str:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi not available"
    return "; ".join(line.strip() for line in out.splitlines()) or "no compute process listed"


def wait_for_gpu(need_gib: float, timeout_s: float, *, mem_get_info: Any = None, sleep: Any = None) -> float:
    """Wait until ``need_gib`` of the GPU is free, polling every 2 s for up to ``timeout_s``; returns the free
    GiB. The server of the round's pair building is stopped just before training; a slow exit can still hold
    its memory for a few seconds, and a server left running by an interrupted run holds it for good: then this
    raises :class:`GPUBusy` naming the processes (nvidia-smi) instead of an out-of-memory error mid-load."""
    import time

    if mem_get_info is None:
        import torch

        mem_get_info = torch.cuda.mem_get_info
    sleep = sleep or time.sleep
    deadline = time.monotonic() + timeout_s
    while True:
        free, total = (x / 2**30 for x in mem_get_info())
        if free >= need_gib:
            return free
        if time.monotonic() >= deadline:
            raise GPUBusy(
                f"the GPU has {free:.1f} GiB free of {total:.1f}, training needs about {need_gib:.1f} (the memory "
                f"planner's peak) and waited {timeout_s:.0f} s (train.gpu_wait_s). Held by: {_gpu_holders()}. Stop "
                "what holds it (a gen_server left by an interrupted run: `pkill -f gen_server`), or lower "
                "train.per_device_train_batch_size / train.max_length")
        log.info("waiting for the GPU: %.1f GiB free, %.1f needed", free, need_gib)
        sleep(2.0)


def prepare(cfg: Config, *, force: bool = False) -> Round:
    """Backend, paths, trackers, and the round's pairs validated and split; raises before any model loads."""
    t = cfg.train
    backend = pick_backend(t.backend)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers/TRL so its patches apply)

    from transformers import AutoTokenizer

    from shared.prompting import load_template

    paths = resolve_train_paths(cfg)
    _check_trackers(t.report_to)
    if t.lora_alpha is not None and t.lora_alpha != t.lora_r:
        log.warning("train.lora_alpha=%d != lora_r=%d: LoRA updates are scaled by %.2f (the original plan's "
                    "alpha=16 with r=64 gives 0.25); alpha = r is the default", t.lora_alpha, t.lora_r,
                    t.lora_alpha / t.lora_r)
    tokenizer = AutoTokenizer.from_pretrained(paths.base_model)
    template = load_template(cfg.model.template)
    report = validate_pairs(paths.pairs_dir, tokenizer, template=template, max_length=t.max_length,
                            max_prompt_length=t.max_prompt_length, max_truncated_fraction=t.max_truncated_fraction,
                            expected_round=t.round)
    report.print_table()
    if not report.ok:
        if not force:
            raise PairsDataError(report.summary() + "\nfix the pairs (or pass --force to train on them anyway)")
        log.warning("training on a dataset that failed validation (--force)")
    ds, eval_ds = split_eval(load_pairs(paths.pairs_dir), t.eval_split, t.seed)
    if eval_ds is None and t.eval_split > 0:
        log.warning("eval split of %d pairs x %.2f rounds to 0: no eval and no early stopping", len(ds), t.eval_split)
    batch_size = resolve_batch_size(cfg, paths.base_model)
    import torch

    if torch.cuda.is_available():
        from trainer.plan import ModelShape, _estimate_for

        shape = ModelShape.from_config(paths.base_model / "config.json")
        peak = _estimate_for(cfg, shape, batch_size)["peak_gib"]
        total = torch.cuda.mem_get_info()[1] / 2**30
        # the planner plans every row at max_length and is 3-28% over: past 80% of the card, ask for 80% only
        wait_for_gpu(min(peak, 0.8 * total), t.gpu_wait_s)
    paths.train_dir.mkdir(parents=True, exist_ok=True)
    return Round(cfg, backend, paths, template, tokenizer, ds, eval_ds, batch_size)


def load_policy(r: Round) -> Policy:
    """The base and its LoRA: a fresh one, or round k-1's adapter continued (``train.continue_adapter``)."""
    cfg, paths, t = r.cfg, r.paths, r.cfg.train
    if paths.init_adapter is not None:
        check_init_adapter(cfg, paths.init_adapter, paths.base_model)
    if r.backend == "unsloth":
        model, tokenizer = load_unsloth(cfg, paths.base_model)
        peft_config = None
    else:
        model, tokenizer = load_peft(cfg, paths.base_model)
        peft_config = lora_config(cfg)
    start_kl = 0.0  # a fresh LoRA starts at the base (B = 0)
    if paths.init_adapter is not None:
        if peft_config is not None:  # wrap here (TRL would): the adapter must exist before its weights load
            from peft import get_peft_model

            model, peft_config = get_peft_model(model, peft_config), None
        continue_adapter(model, paths.init_adapter)
        start_kl = kl_to_base(model, tokenizer, [r.template.render(p) for p in cfg.merge.probe_prompts])
        log.info("round %d starts %.3g (mean next-token KL) away from the original base", t.round, start_kl)
    log.info("backend %s: %s, LoRA r=%d alpha=%d on %s", r.backend, paths.base_model, t.lora_r,
             t.lora_alpha or t.lora_r, ",".join(t.target_modules))
    from trainer.hooks import ensure_logprob_kernel

    ensure_logprob_kernel()  # TRL's trainers compute log-probs with a Triton kernel; an eager one where it is missing
    return Policy(model, tokenizer, peft_config, start_kl)


def callbacks(r: Round, early_metric: str | None = None, *, greater_is_better: bool = True) -> Callbacks:
    """The training-loop hooks every recipe uses; early stopping on ``eval_<early_metric>`` when there is an
    eval split and ``train.early_stopping_patience`` is set."""
    from trainer.hooks import (
        CheckpointMarkerCallback,
        CostCallback,
        NonFiniteLossCallback,
        RewardEarlyStopping,
        ThroughputCallback,
    )

    t = r.cfg.train
    cb = Callbacks(NonFiniteLossCallback(),
                   CostCallback(r.cfg.cost.gpu_usd_per_hour, r.cfg.cost.budget_usd,
                                RunDir.from_config(r.cfg).spent_usd()),  # the budget covers the whole run
                   ThroughputCallback(), None)
    cb.all = [cb.nan_guard, cb.cost, CheckpointMarkerCallback(), cb.speed]
    if r.eval is not None and t.early_stopping_patience and early_metric:
        cb.early = RewardEarlyStopping(early_metric, t.early_stopping_patience, greater_is_better=greater_is_better)
        cb.all.append(cb.early)
    return cb


def round_steps(r: Round) -> int:
    """Optimizer steps this round will take: ``train.max_steps``, else epochs over the training rows."""
    t = r.cfg.train
    if t.max_steps:
        return t.max_steps
    return max(1, math.ceil(math.ceil(len(r.train) / (r.batch_size * t.gradient_accumulation_steps))
                            * t.num_train_epochs))


def training_args(r: Round) -> dict[str, Any]:
    """The TrainingArguments every recipe shares (its own config class adds the method's fields)."""
    import torch

    t = r.cfg.train
    save_steps = max(1, round_steps(r) // 4) if t.save_steps == "auto" else t.save_steps
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    has_eval = r.eval is not None
    return dict(
        output_dir=str(r.paths.train_dir),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        per_device_train_batch_size=r.batch_size,
        per_device_eval_batch_size=r.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps or -1,
        max_length=t.max_length,
        # Unsloth applies its own (offloaded) checkpointing in get_peft_model; HF's on top would redo it.
        gradient_checkpointing=t.gradient_checkpointing and r.backend != "unsloth",
        seed=t.seed,
        optim=t.optim,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(t.eval_steps or save_steps) if has_eval else None,
        report_to=list(t.report_to) or "none",
        bf16=bf16,
        fp16=on_gpu and not bf16,
        use_cpu=not on_gpu,
    )


def fit(r: Round, trainer: Any, cb: Callbacks, *, resume: bool = False) -> str:
    """Train (from the last complete checkpoint with ``resume``), record the stage in the round's ledger, plot
    the curves; returns the status: completed, early_stopped or budget. Raises on NaN loss and GPU OOM."""
    from trainer.hooks import last_complete_checkpoint

    paths, t = r.paths, r.cfg.train
    checkpoint = last_complete_checkpoint(paths.train_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", paths.train_dir)
    elif checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    ledger = CostLedger(paths.round_dir.ledger, usd_per_hour=r.cfg.cost.gpu_usd_per_hour)
    paths.round_dir.path.mkdir(parents=True, exist_ok=True)
    with ledger.stage("train", backend=r.backend, base_model=str(paths.base_model), method=t.method) as stage:
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except Exception as e:
            if type(e).__name__ == "OutOfMemoryError":
                raise MemoryError(oom_message(r.cfg, paths.base_model, r.batch_size)) from e
            raise
        stage.add(steps=trainer.state.global_step, train_pairs=len(r.train))
    write_curves(trainer.state.log_history, paths.train_dir)
    if cb.nan_guard.bad_step is not None:
        good = last_complete_checkpoint(paths.train_dir)
        raise TrainingDiverged(
            f"loss became {cb.nan_guard.bad_value} at step {cb.nan_guard.bad_step}; stopped. Last good checkpoint: "
            f"{good or 'none'}. Lower train.learning_rate (or raise train.beta for DPO), then rerun (--resume "
            "continues from that checkpoint)"
        )
    return "budget" if cb.cost.budget_hit else "early_stopped" if cb.early and cb.early.stopped_at else "completed"


def save_adapter(r: Round, trainer: Any, policy: Policy, cb: Callbacks, status: str,
                 **summary: Any) -> TrainResult:
    """The adapter, its tokenizer and ``train_summary.json``, atomically: a reader sees the old adapter or the
    complete new one. ``summary``: the recipe's own fields."""
    paths, t = r.paths, r.cfg.train
    last = {k: v for row in trainer.state.log_history for k, v in row.items() if isinstance(v, (int, float))}
    with atomic_dir(paths.adapter_dir) as tmp:
        trainer.model.save_pretrained(tmp, selected_adapters=["default"])
        policy.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / SUMMARY_NAME, {
            "status": status, "method": t.method, "round": t.round, "backend": r.backend,
            "base_model": str(paths.base_model),
            "init_adapter": str(paths.init_adapter) if paths.init_adapter else None,
            "start_kl_to_base": policy.start_kl, "base_fingerprint": base_fingerprint(paths.base_model),
            "template_sha256": r.template.sha256, "global_step": trainer.state.global_step,
            "train_pairs": len(r.train), "eval_pairs": len(r.eval) if r.eval is not None else 0, **summary,
            "metrics": last, "throughput": cb.speed.summary(r.batch_size * t.gradient_accumulation_steps),
            "config": t.model_dump(mode="json"),
        })
    log.info("adapter (%s after %d steps) -> %s; curves in %s", status, trainer.state.global_step,
             paths.adapter_dir, paths.train_dir)
    return TrainResult(status, paths.adapter_dir, paths.train_dir, trainer.state.global_step, last)


def cli(train: Callable[..., TrainResult], prog: str, doc: str, argv: list[str] | None = None) -> int:
    """A recipe's command line; exit codes: 0 trained (or early-stopped), 1 data refused, 2 bad config/input,
    3 budget reached (checkpointed; ``--resume`` continues), 4 loss became NaN/inf, 5 out of GPU memory."""
    from shared.log import setup_logging

    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--resume", action="store_true", help="Continue from the last complete checkpoint.")
    parser.add_argument("--force", action="store_true", help="Train even if the data or reference check fails.")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = config_from_args(args)
        result = train(cfg, resume=args.resume, force=args.force)
    except PairsDataError as e:
        log.error("%s", e)
        return 1
    except (ConfigError, FileNotFoundError, RefLogpsMismatch) as e:
        log.error("%s", e)
        return 2
    except TrainingDiverged as e:
        log.error("%s", e)
        return 4
    except MemoryError as e:
        log.error("%s", e)
        return 5
    return 3 if result.status == "budget" else 0
