"""The model side of training, shared by the DPO recipe and the memory planner: which backend, which batch, how
the base loads (Unsloth's FastLanguageModel, or transformers + PEFT: float32 on CPU, bf16 or bitsandbytes 4-bit
on GPU), the LoRA, and continuing last round's adapter over the original base.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from shared.config import Config, ConfigError
from trainer.artifacts import SUMMARY_NAME, base_fingerprint

log = logging.getLogger(__name__)

UNSLOTH_MAX_SEQ_LENGTH = 2048
AUTO_BATCH_FALLBACK = 1  # per-device batch for "auto" when no GPU memory plan applies (CPU)


def pick_backend(requested: str, *, cuda: bool | None = None) -> str:
    """The training backend: ``auto`` -> unsloth when CUDA and unsloth are both present, else peft. ``cuda``:
    whether the run has a GPU (default: this machine's; the planner passes True, planning for a GPU)."""
    import importlib.util

    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if requested != "auto":
        if requested == "unsloth" and not cuda:
            raise ConfigError(["train.backend: unsloth needs a CUDA GPU; use train.backend=peft on CPU"])
        return requested
    return "unsloth" if cuda and importlib.util.find_spec("unsloth") is not None else "peft"


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


def load_unsloth(cfg: Config, base_model: Path) -> tuple[Any, Any]:
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


def load_peft(cfg: Config, base_model: Path) -> tuple[Any, Any]:
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


def lora_config(cfg: Config) -> Any:
    from peft import LoraConfig

    t = cfg.train
    return LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha or t.lora_r, lora_dropout=t.lora_dropout,
                      target_modules=list(t.target_modules), bias="none", task_type="CAUSAL_LM")


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


def oom_message(cfg: Config, base_model: Path, batch_size: int) -> str:
    import torch

    from trainer.plan import largest_fitting_batch

    gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80.0
    fit = largest_fitting_batch(cfg, base_model, gpu_gib=gib)
    hint = f"the planner suggests per_device_train_batch_size={fit}" if fit else "the planner fits no batch"
    return (f"out of GPU memory at per_device_train_batch_size={batch_size} ({hint}; see `python -m trainer.plan "
            "--config CFG`): lower train.per_device_train_batch_size and raise gradient_accumulation_steps to keep "
            "the effective batch, or lower train.max_length")
