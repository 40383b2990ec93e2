"""DPO LoRA training of one round: validate the pairs, train an adapter with TRL's DPOTrainer, save it.

    python -m trainer.dpo --config configs/demo-cpu.yaml [train.round=1 train.max_steps=20] [--resume] [--force]

Backends (``train.backend``): ``unsloth`` (GPU: 4-bit base via FastLanguageModel, Unsloth gradient
checkpointing) and ``peft`` (transformers + PEFT LoRA; float32 on CPU, bitsandbytes 4-bit on GPU); both
train through the same TRL ``DPOTrainer``. Outputs (round k of the run dir):

    round-k/adapter/   the final LoRA adapter + tokenizer + train_summary.json (written atomically)
    round-k/train/     checkpoint-N/ (adapter + optimizer/scheduler/RNG state), tensorboard runs/,
                       metrics.jsonl, loss.png, rewards.png

Exit codes: 0 trained (or early-stopped), 1 data refused, 2 bad config/input, 3 budget reached
(checkpointed; ``--resume`` continues), 4 loss became NaN/inf (last good checkpoint kept), 5 out of GPU
memory (the message names the planner's batch size).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
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


def _check_trackers(report_to: list[str]) -> None:
    """Fail before any model loads when a configured tracker is not installed."""
    import importlib.util

    modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    missing = [name for name in report_to
               if name in modules and not any(importlib.util.find_spec(m) for m in modules[name])]
    if missing:
        raise ConfigError([f"train.report_to: {', '.join(missing)} not installed; `pip install {' '.join(missing)}` "
                           "or drop it (train.report_to=[])"])


def _dpo_config(cfg: Config, backend: str, train_dir: Path, batch_size: int, has_eval: bool,
                use_ref_logps: bool) -> Any:
    import torch
    from trl import DPOConfig

    t = cfg.train
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    eval_steps = t.eval_steps or t.save_steps
    return DPOConfig(
        output_dir=str(train_dir),
        beta=t.beta,
        loss_type=[t.loss_type] if isinstance(t.loss_type, str) else list(t.loss_type),
        loss_weights=t.loss_weights,
        ld_alpha=t.ld_alpha,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps or -1,
        max_length=t.max_length,
        precompute_ref_log_probs=use_ref_logps or t.precompute_ref_log_probs,
        # Unsloth applies its own (offloaded) checkpointing in get_peft_model; HF's on top would redo it.
        gradient_checkpointing=t.gradient_checkpointing and backend != "unsloth",
        seed=t.seed,
        optim=t.optim,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        report_to=list(t.report_to) or "none",
        bf16=bf16,
        fp16=on_gpu and not bf16,
        use_cpu=not on_gpu,
    )


def check_ref_logps(trainer: Any, rows: int, tolerance: float) -> dict[str, float]:
    """Recompute the reference log-probs of the first ``rows`` training pairs; compare per response token."""
    import torch

    ds = trainer.train_dataset.select(range(min(rows, len(trainer.train_dataset))))
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
    own_c, own_r = trainer.compute_ref_log_probs(trainer.model, batch)
    tokens = batch["completion_mask"].sum(dim=1).float().chunk(2)
    diffs = torch.cat([
        (own_c.float().cpu() - batch["ref_chosen_logps"].float().cpu()).abs() / tokens[0].cpu(),
        (own_r.float().cpu() - batch["ref_rejected_logps"].float().cpu()).abs() / tokens[1].cpu(),
    ])
    out = {"rows": len(ds), "mean_abs_diff_per_token": diffs.mean().item(),
           "max_abs_diff_per_token": diffs.max().item()}
    log.info("supplied vs recomputed reference log-probs on %d rows: mean |diff| %.2e, max %.2e nats/token "
             "(tolerance %.2e)", out["rows"], out["mean_abs_diff_per_token"], out["max_abs_diff_per_token"], tolerance)
    if out["max_abs_diff_per_token"] > tolerance:
        raise RefLogpsMismatch(
            f"the pairs' ref_chosen_logps/ref_rejected_logps differ from this trainer's reference model by up to "
            f"{out['max_abs_diff_per_token']:.3g} nats/token (tolerance train.ref_check_tolerance="
            f"{tolerance:g}): they were scored by another model or template. Rescore the pairs with this round's "
            "model, drop the two columns, or pass --force"
        )
    return out


def _spent_before(cfg: Config) -> float:
    """Dollars already recorded in every round's ledger of this run (the budget covers the whole run)."""
    return RunDir.from_config(cfg).spent_usd()


def train(cfg: Config, *, resume: bool = False, force: bool = False) -> TrainResult:
    """Validate the round's pairs, train the LoRA adapter with DPO, save it; see the module doc."""
    t = cfg.train
    backend = pick_backend(t.backend)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers/TRL so its patches apply)

    from transformers import AutoTokenizer

    from shared.prompting import load_template

    paths: TrainPaths = resolve_train_paths(cfg)
    _check_trackers(t.report_to)
    if t.lora_alpha is not None and t.lora_alpha != t.lora_r:
        log.warning("train.lora_alpha=%d != lora_r=%d: LoRA updates are scaled by %.2f (the original plan's "
                    "alpha=16 with r=64 gives 0.25); alpha = r is the default", t.lora_alpha, t.lora_r,
                    t.lora_alpha / t.lora_r)

    # 1. Data, before any model loads.
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

    ds = load_pairs(paths.pairs_dir)
    ref_cols = [c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in ds.column_names]
    if ref_cols and t.ld_alpha is not None:
        log.info("train.ld_alpha=%s weighs the response tails: the pairs' summed reference log-probs do not apply, "
                 "the trainer computes its own", t.ld_alpha)
        ref_cols = []
    use_ref_logps = len(ref_cols) == 2
    ds, eval_ds = split_eval(ds, t.eval_split, t.seed)
    if eval_ds is None and t.eval_split > 0:
        log.warning("eval split of %d pairs x %.2f rounds to 0: no eval and no early stopping", len(ds), t.eval_split)
    keep = ["prompt", "chosen", "rejected", *ref_cols]
    ds = ds.select_columns(keep)
    eval_ds = eval_ds.select_columns(keep) if eval_ds is not None else None

    batch_size = resolve_batch_size(cfg, paths.base_model)
    paths.train_dir.mkdir(parents=True, exist_ok=True)
    args = _dpo_config(cfg, backend, paths.train_dir, batch_size, eval_ds is not None, use_ref_logps)

    # 2. Model.
    if paths.init_adapter is not None:
        check_init_adapter(cfg, paths.init_adapter, paths.base_model)
    if backend == "unsloth":
        model, tokenizer = load_unsloth(cfg, paths.base_model)
        peft_config = None
    else:
        model, tokenizer = load_peft(cfg, paths.base_model)
        peft_config = lora_config(cfg)
    if paths.init_adapter is not None:
        if peft_config is not None:  # wrap here (TRL would): the adapter must exist before its weights load
            from peft import get_peft_model

            model, peft_config = get_peft_model(model, peft_config), None
        continue_adapter(model, paths.init_adapter)
        start_kl = kl_to_base(model, tokenizer, [template.render(p) for p in cfg.merge.probe_prompts])
        log.info("round %d starts %.3g (mean next-token KL) away from the original base", t.round, start_kl)
    else:
        start_kl = 0.0  # a fresh LoRA starts at the base (B = 0)
    log.info("backend %s: %s, LoRA r=%d alpha=%d on %s", backend, paths.base_model, t.lora_r,
             t.lora_alpha or t.lora_r, ",".join(t.target_modules))

    from trainer.hooks import (
        CheckpointMarkerCallback,
        CostCallback,
        NonFiniteLossCallback,
        RewardEarlyStopping,
        SuppliedRefDPOTrainer,
        ThroughputCallback,
        ensure_logprob_kernel,
        last_complete_checkpoint,
    )

    ensure_logprob_kernel()

    nan_guard = NonFiniteLossCallback()
    cost = CostCallback(cfg.cost.gpu_usd_per_hour, cfg.cost.budget_usd, _spent_before(cfg))
    speed = ThroughputCallback()
    callbacks: list[Any] = [nan_guard, cost, CheckpointMarkerCallback(), speed]
    early = None
    if eval_ds is not None and t.early_stopping_patience:
        early = RewardEarlyStopping(t.early_stopping_metric, t.early_stopping_patience)
        callbacks.append(early)

    # 3. Trainer.
    trainer = SuppliedRefDPOTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    ref_check: dict[str, float] = {}
    if use_ref_logps and t.ref_check_rows:
        try:
            ref_check = check_ref_logps(trainer, t.ref_check_rows, t.ref_check_tolerance)
        except RefLogpsMismatch:
            if not force:
                raise
            log.warning("reference log-probs disagree; training on them anyway (--force)")

    checkpoint = last_complete_checkpoint(paths.train_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", paths.train_dir)
    elif checkpoint is not None:
        log.info("resuming from %s", checkpoint)

    # 4. Train, recorded in the round's cost ledger.
    ledger = CostLedger(paths.round_dir.ledger, usd_per_hour=cfg.cost.gpu_usd_per_hour)
    paths.round_dir.path.mkdir(parents=True, exist_ok=True)
    with ledger.stage("train", backend=backend, base_model=str(paths.base_model)) as stage:
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except Exception as e:
            if type(e).__name__ == "OutOfMemoryError":
                raise MemoryError(oom_message(cfg, paths.base_model, batch_size)) from e
            raise
        stage.add(steps=trainer.state.global_step, train_pairs=len(ds))

    write_curves(trainer.state.log_history, paths.train_dir)
    last = {k: v for r in trainer.state.log_history for k, v in r.items() if isinstance(v, (int, float))}
    if nan_guard.bad_step is not None:
        good = last_complete_checkpoint(paths.train_dir)
        raise TrainingDiverged(
            f"loss became {nan_guard.bad_value} at step {nan_guard.bad_step}; stopped. Last good checkpoint: "
            f"{good or 'none'}. Lower train.learning_rate or raise train.beta, then rerun (--resume continues "
            "from that checkpoint)"
        )
    status = "budget" if cost.budget_hit else "early_stopped" if early and early.stopped_at else "completed"

    # 5. The adapter, atomically: a reader sees the old adapter or the complete new one.
    with atomic_dir(paths.adapter_dir) as tmp:
        trainer.model.save_pretrained(tmp, selected_adapters=["default"])
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / SUMMARY_NAME, {
            "status": status, "round": t.round, "backend": backend, "base_model": str(paths.base_model),
            "init_adapter": str(paths.init_adapter) if paths.init_adapter else None, "start_kl_to_base": start_kl,
            "base_fingerprint": base_fingerprint(paths.base_model), "template_sha256": template.sha256,
            "global_step": trainer.state.global_step, "train_pairs": len(ds),
            "eval_pairs": len(eval_ds) if eval_ds is not None else 0, "ref_logps": "dataset" if use_ref_logps else
            ("precomputed" if t.precompute_ref_log_probs else "online"), "ref_check": ref_check, "metrics": last,
            "throughput": speed.summary(batch_size * t.gradient_accumulation_steps),
            "config": cfg.train.model_dump(mode="json"),
        })
    log.info("adapter (%s after %d steps) -> %s; curves in %s", status, trainer.state.global_step,
             paths.adapter_dir, paths.train_dir)
    return TrainResult(status, paths.adapter_dir, paths.train_dir, trainer.state.global_step, last)


def main(argv: list[str] | None = None) -> int:
    from shared.log import setup_logging

    parser = argparse.ArgumentParser(prog="python -m trainer.dpo", description=__doc__.split("\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
