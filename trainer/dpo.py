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
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.atomic import atomic_dir, atomic_write_json, atomic_write_text
from shared.config import Config, ConfigError, add_config_args, config_from_args
from shared.ledger import CostLedger
from shared.rundir import RunDir
from trainer.data import PairsDataError, load_pairs, split_eval, validate_pairs
from trainer.paths import TrainPaths, resolve_train_paths

log = logging.getLogger(__name__)

UNSLOTH_MAX_SEQ_LENGTH = 2048
AUTO_BATCH_FALLBACK = 1  # per-device batch for "auto" when no GPU memory plan applies (CPU)
SUMMARY_NAME = "train_summary.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class RefLogpsMismatch(ValueError):
    """The dataset's reference log-probs disagree with the trainer's own reference model."""


@dataclass
class TrainResult:
    status: str  # completed | early_stopped | budget | diverged
    adapter_dir: Path | None
    train_dir: Path
    global_step: int
    metrics: dict[str, float]


def pick_backend(requested: str) -> str:
    """``auto`` -> unsloth when CUDA and unsloth are both present, else peft."""
    import importlib.util

    import torch

    if requested != "auto":
        if requested == "unsloth" and not torch.cuda.is_available():
            raise ConfigError(["train.backend: unsloth needs a CUDA GPU; use train.backend=peft on CPU"])
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None:
        return "unsloth"
    return "peft"


def resolve_batch_size(cfg: Config, base_model: Path) -> int:
    """An int is taken as is; ``auto`` asks the memory planner on GPU, else uses a batch of 1."""
    bs = cfg.train.per_device_train_batch_size
    if bs != "auto":
        return int(bs)
    import torch

    if torch.cuda.is_available():
        from trainer.plan import largest_fitting_batch

        gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        fit = largest_fitting_batch(cfg, base_model, gpu_gib=gib)
        if fit is None:
            raise ConfigError([f"train.per_device_train_batch_size=auto: not even batch 1 fits in {gib:.0f} GiB "
                               "(see `python -m trainer.plan --config CFG`); lower train.max_length or lora_r"])
        log.info("batch size auto -> %d (planner, %.0f GiB GPU)", fit, gib)
        return fit
    log.info("batch size auto -> %d (no GPU to plan for)", AUTO_BATCH_FALLBACK)
    return AUTO_BATCH_FALLBACK


def _load_unsloth(cfg: Config, base_model: Path) -> tuple[Any, Any]:
    import unsloth
    from unsloth import FastLanguageModel

    if hasattr(unsloth, "PatchDPOTrainer"):  # Unsloth's DPO recipe; newer releases patch TRL on import
        unsloth.PatchDPOTrainer()
    t = cfg.train
    max_seq_length = max(UNSLOTH_MAX_SEQ_LENGTH, t.max_length)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(base_model), max_seq_length=max_seq_length, dtype=None, load_in_4bit=t.load_in_4bit
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=t.lora_r,
        target_modules=list(t.target_modules),
        lora_alpha=t.lora_alpha or t.lora_r,
        lora_dropout=t.lora_dropout,
        bias="none",
        use_gradient_checkpointing="unsloth" if t.gradient_checkpointing else False,
        random_state=t.seed,
        max_seq_length=max_seq_length,
    )
    return model, tokenizer


def _load_peft(cfg: Config, base_model: Path) -> tuple[Any, Any]:
    """A plain transformers model (TRL wraps it with the LoraConfig from :func:`lora_config`)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if torch.cuda.is_available():
        kwargs = {"dtype": torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16, "device_map": {"": 0}}
        if cfg.train.load_in_4bit:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError(["train.load_in_4bit: bitsandbytes is not installed; `pip install bitsandbytes` "
                                   "or set train.load_in_4bit=false"])
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=kwargs["dtype"],
            )
    model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    if "quantization_config" in kwargs:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    return model, AutoTokenizer.from_pretrained(base_model)


def other_base(adapter_dir: Path, base_model: Path) -> dict[str, Any] | None:
    """The shape of the base ``adapter_dir`` was trained on when it is not ``base_model``'s, else None."""
    summary = adapter_dir / SUMMARY_NAME
    trained_on = json.loads(summary.read_text()).get("base_fingerprint") if summary.is_file() else None
    return trained_on if trained_on and trained_on != base_fingerprint(base_model) else None


def check_init_adapter(cfg: Config, init_adapter: Path, base_model: Path) -> None:
    """Refuse to continue an adapter whose LoRA shape or base differ from this round's settings."""
    t = cfg.train
    ac = json.loads((init_adapter / "adapter_config.json").read_text())
    problems = []
    if ac.get("r") != t.lora_r:
        problems.append(f"r={ac.get('r')} (train.lora_r={t.lora_r})")
    if ac.get("lora_alpha") != (t.lora_alpha or t.lora_r):
        problems.append(f"lora_alpha={ac.get('lora_alpha')} (train.lora_alpha={t.lora_alpha or t.lora_r})")
    if set(ac.get("target_modules") or []) != set(t.target_modules):
        problems.append(f"target_modules={sorted(ac.get('target_modules') or [])} (train.target_modules="
                        f"{sorted(t.target_modules)})")
    if trained_on := other_base(init_adapter, base_model):
        problems.append(f"trained on a base shaped {trained_on}, not {base_model}")
    if problems:
        raise ConfigError([f"train.continue_adapter: round {t.round - 1}'s adapter {init_adapter} has "
                           f"{'; '.join(problems)}. Keep the LoRA settings across rounds, or set "
                           "train.continue_adapter=false to train a fresh LoRA on the last merge"])


def continue_adapter(model: Any, init_adapter: Path) -> None:
    """Start the trainable ``default`` adapter of peft ``model`` from ``init_adapter``: round k starts from, and (as
    DPO's reference) is held near, the policy round k-1 produced."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(init_adapter / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights, adapter_name="default")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing or getattr(result, "unexpected_keys", []):
        raise ConfigError([f"train.continue_adapter: {init_adapter} does not fit this model's LoRA layers "
                           f"(missing {missing[:3]}, unexpected {list(getattr(result, 'unexpected_keys', []))[:3]})"])
    # TRL's DPOTrainer, given a peft model, copies its "default" adapter into a frozen "ref" adapter and computes
    # every reference log-prob with it: the reference is this very starting policy.
    log.info("continuing %s: the trainable adapter and DPO's frozen reference copy both start from it", init_adapter)


def kl_to_base(model: Any, tokenizer: Any, probes: list[str]) -> float:
    """Mean next-token KL(policy || the same base with every adapter disabled) on the rendered probe prompts:
    how far the starting policy already is from the original base (the merge reports the same measure)."""
    from trainer.merge import adapter_effect, next_token_logprobs

    was_training = model.training
    model.eval()
    try:
        return adapter_effect(model, tokenizer, probes, next_token_logprobs(model, tokenizer, probes))
    finally:
        model.train(was_training)


def lora_config(cfg: Config) -> Any:
    from peft import LoraConfig

    t = cfg.train
    return LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha or t.lora_r, lora_dropout=t.lora_dropout,
                      target_modules=list(t.target_modules), bias="none", task_type="CAUSAL_LM")


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


def write_curves(log_history: list[dict[str, Any]], train_dir: Path) -> list[Path]:
    """metrics.jsonl (one line per log event) and PNG curves: loss, reward margins and accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atomic_write_text(train_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in log_history))
    written = [train_dir / "metrics.jsonl"]

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in log_history if key in r and "step" in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    panels = {
        "loss.png": [("loss", "train loss"), ("eval_loss", "eval loss")],
        "rewards.png": [("rewards/margins", "train margin"), ("eval_rewards/margins", "eval margin"),
                        ("rewards/accuracies", "train accuracy"), ("eval_rewards/accuracies", "eval accuracy")],
    }
    for name, keys in panels.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in keys:
            xs, ys = series(key)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label)
        ax.set_xlabel("step")
        ax.set_title(name.removesuffix(".png"))
        ax.grid(alpha=0.3)
        ax.legend()
        tmp = train_dir / f".{name}.tmp"
        fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        tmp.replace(train_dir / name)
        written.append(train_dir / name)
    return written


def _spent_before(cfg: Config) -> float:
    """Dollars already recorded in every round's ledger of this run (the budget covers the whole run)."""
    return RunDir.from_config(cfg).spent_usd()


def base_fingerprint(base_model: Path) -> dict[str, Any]:
    """The base's shape, recorded with the adapter so a merge into another base is refused."""
    c = json.loads((base_model / "config.json").read_text())
    text = c.get("text_config", c)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")
    return {k: text.get(k) for k in keys}


def _oom_message(cfg: Config, base_model: Path, batch_size: int) -> str:
    import torch

    from trainer.plan import largest_fitting_batch

    gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80.0
    fit = largest_fitting_batch(cfg, base_model, gpu_gib=gib)
    hint = f"the planner suggests per_device_train_batch_size={fit}" if fit else "the planner fits no batch"
    return (f"out of GPU memory at per_device_train_batch_size={batch_size} ({hint}; see `python -m trainer.plan "
            "--config CFG`): lower train.per_device_train_batch_size and raise gradient_accumulation_steps to keep "
            "the effective batch, or lower train.max_length")


def _check_trackers(report_to: list[str]) -> None:
    """Fail before any model loads when a configured tracker is not installed."""
    import importlib.util

    modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    missing = [name for name in report_to
               if name in modules and not any(importlib.util.find_spec(m) for m in modules[name])]
    if missing:
        raise ConfigError([f"train.report_to: {', '.join(missing)} not installed; `pip install {' '.join(missing)}` "
                           "or drop it (train.report_to=[])"])


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

    # 2. Model.
    if paths.init_adapter is not None:
        check_init_adapter(cfg, paths.init_adapter, paths.base_model)
    if backend == "unsloth":
        model, tokenizer = _load_unsloth(cfg, paths.base_model)
        peft_config = None
    else:
        model, tokenizer = _load_peft(cfg, paths.base_model)
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

    paths.train_dir.mkdir(parents=True, exist_ok=True)
    trainer = SuppliedRefDPOTrainer(
        model=model,
        args=_dpo_config(cfg, backend, paths.train_dir, batch_size, eval_ds is not None, use_ref_logps),
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

    # 3. Train, recorded in the round's cost ledger.
    ledger = CostLedger(paths.round_dir.ledger, usd_per_hour=cfg.cost.gpu_usd_per_hour)
    paths.round_dir.path.mkdir(parents=True, exist_ok=True)
    with ledger.stage("train", backend=backend, base_model=str(paths.base_model)) as stage:
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except Exception as e:
            if type(e).__name__ == "OutOfMemoryError":
                raise MemoryError(_oom_message(cfg, paths.base_model, batch_size)) from e
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

    # 4. The adapter, atomically: a reader sees the old adapter or the complete new one.
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
