"""DPO LoRA training of one round: validate the pairs, train an adapter with TRL's DPOTrainer, save it.

    python -m trainer.dpo --config configs/demo-cpu.yaml [train.round=1 train.max_steps=20] [--resume] [--force]

Backends (``train.backend``): ``unsloth`` (GPU: 4-bit base via FastLanguageModel, Unsloth gradient
checkpointing) and ``peft`` (transformers + PEFT LoRA; float32 on CPU, bitsandbytes 4-bit on GPU); both
train through the same TRL ``DPOTrainer``. Outputs (round k of the run dir):

    round-k/adapter/   the final LoRA adapter + tokenizer + train_summary.json (written atomically)
    round-k/train/     checkpoint-N/ (adapter + optimizer/scheduler/RNG state), tensorboard runs/,
                       metrics.jsonl, loss.png, rewards.png

The steps every recipe shares (data checks, model loading, callbacks, the ledger, the atomic save) are in
``trainer.recipe``; this file is what is DPO's own: its config, the supplied reference log-probs and their check.
Exit codes (``trainer.recipe.cli``): 0 trained (or early-stopped), 1 data refused, 2 bad config/input, 3 budget
reached (checkpointed; ``--resume`` continues), 4 loss became NaN/inf (last good checkpoint kept), 5 out of GPU
memory (the message names the planner's batch size).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from shared.config import Config
from trainer.artifacts import RefLogpsMismatch, TrainResult
from trainer.recipe import Round, callbacks, cli, fit, load_policy, prepare, save_adapter, training_args

log = logging.getLogger(__name__)

REF_COLS = ("ref_chosen_logps", "ref_rejected_logps")


def dpo_config(r: Round, use_ref_logps: bool) -> Any:
    """TRL's DPOConfig for the round; built (and checked by TRL) before any model loads."""
    from trl import DPOConfig

    t = r.cfg.train
    return DPOConfig(
        **training_args(r),
        beta=t.beta,
        loss_type=[t.loss_type] if isinstance(t.loss_type, str) else list(t.loss_type),
        loss_weights=t.loss_weights,
        ld_alpha=t.ld_alpha,
        precompute_ref_log_probs=use_ref_logps or t.precompute_ref_log_probs,
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


def train(cfg: Config, *, resume: bool = False, force: bool = False) -> TrainResult:
    """Validate the round's pairs, train the LoRA adapter with DPO, save it; see the module doc."""
    t = cfg.train

    # 1. Data and the DPO config, before any model loads.
    r = prepare(cfg, force=force)
    ref_cols = [c for c in REF_COLS if c in r.train.column_names]
    if ref_cols and t.ld_alpha is not None:
        log.info("train.ld_alpha=%s weighs the response tails: the pairs' summed reference log-probs do not apply, "
                 "the trainer computes its own", t.ld_alpha)
        ref_cols = []
    use_ref_logps = len(ref_cols) == 2
    keep = ["prompt", "chosen", "rejected", *ref_cols]
    r.train = r.train.select_columns(keep)
    r.eval = r.eval.select_columns(keep) if r.eval is not None else None
    args = dpo_config(r, use_ref_logps)

    # 2. Model: the base and its LoRA (round k>0 continues round k-1's; its frozen copy is the reference).
    policy = load_policy(r)

    # 3. Trainer, and the supplied reference log-probs checked against its own reference.
    from trainer.hooks import SuppliedRefDPOTrainer

    cb = callbacks(r, t.early_stopping_metric)
    trainer = SuppliedRefDPOTrainer(model=policy.model, args=args, train_dataset=r.train, eval_dataset=r.eval,
                                    processing_class=policy.tokenizer, peft_config=policy.peft_config,
                                    callbacks=cb.all)
    ref_check: dict[str, float] = {}
    if use_ref_logps and t.ref_check_rows:
        try:
            ref_check = check_ref_logps(trainer, t.ref_check_rows, t.ref_check_tolerance)
        except RefLogpsMismatch:
            if not force:
                raise
            log.warning("reference log-probs disagree; training on them anyway (--force)")

    # 4. Train, recorded in the round's cost ledger; 5. the adapter, atomically.
    status = fit(r, trainer, cb, resume=resume)
    ref_logps = "dataset" if use_ref_logps else ("precomputed" if t.precompute_ref_log_probs else "online")
    return save_adapter(r, trainer, policy, cb, status, ref_logps=ref_logps, ref_check=ref_check)


def main(argv: list[str] | None = None) -> int:
    return cli(train, "python -m trainer.dpo", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
