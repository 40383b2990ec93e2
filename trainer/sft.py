"""SFT LoRA training of one round on the pairs' chosen answers: validate the pairs, train an adapter with TRL's
SFTTrainer (loss on the answer only, end-of-text appended), save it.

    python -m trainer.sft --config CFG [train.round=1 train.max_steps=20] [--resume] [--force]

``train.method: sft`` runs it in the pipeline: rejection-sampling fine-tuning (RAFT / ReST-style expert
iteration), where each round's verified best answers are the targets. Against DPO it has no rejected side, so it
cannot push down what the answers share with worse ones (DPO lowers the likelihood of both sides of a pair that
differ in a few tokens, "likelihood displacement"), and needs no reference model. Which answers: the chosen side
of every pair the round built (checker pairs, stop pairs' finished answers, format repairs, habit contrasts'
plain side), each (prompt, answer) once. Same backends, paths, checks, callbacks, outputs and exit codes as
``trainer.dpo`` (``trainer.recipe``); early stopping watches the eval split's loss.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from shared.config import Config
from trainer.artifacts import TrainResult
from trainer.recipe import Round, callbacks, cli, fit, load_policy, prepare, save_adapter, training_args

log = logging.getLogger(__name__)


def chosen_answers(ds: Any) -> Any:
    """``prompt``/``completion`` rows from the pairs' ``prompt``/``chosen``, each distinct pair of them once."""
    seen: set[tuple[str, str]] = set()
    keep = []
    for i, (p, c) in enumerate(zip(ds["prompt"], ds["chosen"], strict=True)):
        if (p, c) not in seen:
            seen.add((p, c))
            keep.append(i)
    return ds.select(keep).select_columns(["prompt", "chosen"]).rename_column("chosen", "completion")


def sft_config(r: Round) -> Any:
    """TRL's SFTConfig for the round; built (and checked by TRL) before any model loads."""
    from trl import SFTConfig

    return SFTConfig(**training_args(r), completion_only_loss=True, packing=False)


def train(cfg: Config, *, resume: bool = False, force: bool = False) -> TrainResult:
    """Validate the round's pairs, train the LoRA adapter on their chosen answers, save it; see the module doc."""
    # 1. Data and the SFT config, before any model loads.
    r = prepare(cfg, force=force)
    pairs = len(r.train)
    r.train = chosen_answers(r.train)
    r.eval = chosen_answers(r.eval) if r.eval is not None else None
    log.info("SFT on %d distinct chosen answers of %d training pairs", len(r.train), pairs)
    args = sft_config(r)

    # 2. Model: the base and its LoRA (round k>0 continues round k-1's).
    policy = load_policy(r)

    # 3. Trainer.
    from trl import SFTTrainer

    cb = callbacks(r, "loss", greater_is_better=False)
    trainer = SFTTrainer(model=policy.model, args=args, train_dataset=r.train, eval_dataset=r.eval,
                         processing_class=policy.tokenizer, peft_config=policy.peft_config, callbacks=cb.all)

    # 4. Train, recorded in the round's cost ledger; 5. the adapter, atomically.
    status = fit(r, trainer, cb, resume=resume)
    return save_adapter(r, trainer, policy, cb, status, pairs=pairs)


def main(argv: list[str] | None = None) -> int:
    return cli(train, "python -m trainer.sft", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
