"""Training-loop hooks for the recipes (``trainer.recipe``): callbacks (NaN guard, budget, early stopping,
checkpoint markers), the DPOTrainer subclass that uses reference log-probs the pairs already carry, and an eager
stand-in for TRL's Triton log-prob kernel where Triton is missing (CPU builds of torch).

Imports transformers and TRL at module level, so the recipes import it only after Unsloth (which must
patch them first).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from trl import DPOTrainer

from shared.atomic import atomic_write_text

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"


class EagerLogProbFunction:
    """Drop-in for ``trl.kernels.ChunkedLogProbFunction`` in plain PyTorch (autograd does the backward).

    TRL 1.15's DPOTrainer always computes per-token log-probs through a Triton kernel, which the CPU torch
    build lacks (and Triton cannot run on CPU). This materializes the ``[N, V]`` logits, fine at CPU sizes.
    """

    @staticmethod
    def apply(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              temperature: float, chunk_size: int, final_logit_softcapping: float | None = None,
              logit_scale: float = 1.0, outputs: tuple[str, ...] = ()) -> tuple[torch.Tensor | None, ...]:
        z = F.linear(hidden, weight, bias).float() * logit_scale
        if final_logit_softcapping:
            z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
        z = z / temperature
        logp_all = z.log_softmax(dim=-1)
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1) if "entropy" in outputs else None
        with torch.no_grad():
            lssp = torch.logsumexp(2 * logp_all, dim=-1) if "log_sum_sq_probs" in outputs else None
            mean_logits = z.mean(-1) if "mean_logits" in outputs else None
            is_top1 = (z.argmax(-1) == targets) if "is_top1" in outputs else None
        return logp, entropy, lssp, mean_logits, is_top1


def ensure_logprob_kernel() -> None:
    """Install :class:`EagerLogProbFunction` when TRL could not import its Triton kernel."""
    import trl.trainer.utils as trl_utils

    if trl_utils._ChunkedLogProbFunction is None:
        log.info("Triton is not available: computing DPO log-probs in eager PyTorch")
        trl_utils._ChunkedLogProbFunction = EagerLogProbFunction


class SuppliedRefDPOTrainer(DPOTrainer):
    """DPOTrainer that takes ``ref_chosen_logps`` / ``ref_rejected_logps`` from the dataset when present.

    With ``precompute_ref_log_probs=True`` TRL reads the reference log-probs from each batch; stock TRL would
    recompute them over the whole dataset first. Pairs scored by the server that holds the 16-bit reference
    model already carry them, so that pass (a large share of DPO's compute) is skipped.
    """

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        if {"ref_chosen_logps", "ref_rejected_logps"} <= set(dataset.column_names):
            log.info("%s: using the dataset's reference log-probs (no reference pass)", name)
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


class ThroughputCallback(TrainerCallback):
    """Wall time of every optimizer step (CUDA synchronized) and the peak GPU memory, for summaries and bench/."""

    def __init__(self) -> None:
        self.step_s: list[float] = []
        self._t0 = 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._sync()
        self.step_s.append(time.perf_counter() - self._t0)

    def summary(self, pairs_per_step: int, warmup: int = 2) -> dict[str, float | None]:
        """Median step time after ``warmup`` steps (compile, allocator warm-up), pairs/s and peak GiB."""
        steady = sorted(self.step_s[warmup:] or self.step_s)
        median = steady[len(steady) // 2] if steady else None
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        return {"step_s_median": median, "pairs_per_s": pairs_per_step / median if median else None,
                "peak_vram_gib": peak, "steps_timed": len(self.step_s)}


class NonFiniteLossCallback(TrainerCallback):
    """Stop at the first NaN/inf loss, before that step is evaluated or checkpointed.

    Runs in ``on_log`` (every ``logging_steps``): the Trainer logs before it evaluates and saves, so clearing
    ``should_save`` here keeps the last checkpoint the last good one.
    """

    def __init__(self) -> None:
        self.bad_step: int | None = None
        self.bad_value: float | None = None

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kw: Any) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.bad_step, self.bad_value = state.global_step, loss
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False


class CostCallback(TrainerCallback):
    """Logs elapsed cost and ETA; stops with a checkpoint once ``spent_before + this run`` reaches the budget."""

    def __init__(self, usd_per_hour: float, budget_usd: float | None, spent_before_usd: float) -> None:
        self.usd_per_hour = usd_per_hour
        self.budget_usd = budget_usd
        self.spent_before_usd = spent_before_usd
        self.started = time.time()
        self.start_step = 0
        self.budget_hit = False

    def cost_usd(self) -> float:
        return self.spent_before_usd + (time.time() - self.started) / 3600.0 * self.usd_per_hour

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.started = time.time()
        self.start_step = state.global_step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.budget_usd is not None and self.cost_usd() >= self.budget_usd:
            self.budget_hit = True
            control.should_save = True
            control.should_training_stop = True
            log.warning("budget reached: $%.2f of $%.2f at step %d; checkpointing and stopping "
                        "(raise cost.budget_usd and rerun with --resume to continue)",
                        self.cost_usd(), self.budget_usd, state.global_step)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kw: Any) -> None:
        logs = logs or {}
        if "loss" not in logs:
            return
        done = state.global_step - self.start_step
        elapsed = time.time() - self.started
        left = max(state.max_steps - state.global_step, 0)
        eta_s = elapsed / done * left if done else float("nan")
        log.info(
            "step %d/%d loss %.4f margin %.4f acc %.2f | %.1f s/step, ETA %.0f s, cost $%.4f (ETA $%.4f)",
            state.global_step, state.max_steps, logs["loss"], logs.get("rewards/margins", float("nan")),
            logs.get("rewards/accuracies", float("nan")), elapsed / max(done, 1), eta_s, self.cost_usd(),
            self.cost_usd() + eta_s / 3600.0 * self.usd_per_hour,
        )


class RewardEarlyStopping(TrainerCallback):
    """Stop when the eval split's ``metric`` (DPO: reward accuracy or margin; SFT: ``loss``, with
    ``greater_is_better=False``) has not improved for ``patience`` evaluations."""

    def __init__(self, metric: str, patience: int, min_delta: float = 0.0, *, greater_is_better: bool = True) -> None:
        self.key = f"eval_{metric}"
        self.patience = patience
        self.min_delta = min_delta
        self.sign = 1.0 if greater_is_better else -1.0
        self.best: float | None = None
        self.bad_evals = 0
        self.stopped_at: int | None = None

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kw: Any) -> None:
        value = (metrics or {}).get(self.key)
        if value is None:
            log.warning("early stopping: %s not in the eval metrics; not stopping on it", self.key)
            return
        if self.best is None or self.sign * (value - self.best) > self.min_delta:
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = True
            log.info("early stop at step %d: %s has not beaten %.4f for %d evaluations",
                     state.global_step, self.key, self.best, self.patience)


class CheckpointMarkerCallback(TrainerCallback):
    """Mark a checkpoint complete once the Trainer has written all of it.

    ``--resume`` only picks marked checkpoints, so one torn by a crash mid-save is never resumed from.
    """

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            atomic_write_text(ckpt / COMPLETE_MARKER, f"{state.global_step}\n")


def last_complete_checkpoint(train_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` under ``train_dir`` that carries the completion marker."""
    ckpts = [p for p in train_dir.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / COMPLETE_MARKER).is_file()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)
