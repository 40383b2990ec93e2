"""GPU memory planner for DPO LoRA training: will this model, batch and length fit, before an hour is spent?

    python -m trainer.plan --config CFG [--gpu-gib 80] [--shape qwen2.5-32b]

Prints each term of the estimated peak (GiB), ``peak_gib: X``, the largest per-device batch of 1/2/4/8
that fits, and a last line ``fits: yes`` or ``fits: no`` (for the configured batch; ``auto`` = batch 1).
The shape comes from the base model's config.json, or ``--shape`` for a known model without its files.

The model (an estimate, to be checked against measured peaks on the GPU):
  weights      linear layers at 4 bits (nf4 + double-quant scales = 4.127 bits) or 16; embeddings and an
               untied LM head stay 16-bit (bitsandbytes does not quantize them)
  lora         adapter weights + grads (bf16 on a 4-bit base, as TRL casts them; else fp32) + optimizer
               states (AdamW: 8 B/param, 8-bit AdamW: 2 B/param)
  activations  DPO runs chosen and rejected together (2 x batch sequences). With gradient checkpointing:
               each layer's bf16 input is kept, plus one layer recomputed at a time; without: every layer's
  logits       unsloth: a chunked kernel (a 4096-token x 32768-vocab bf16 tile for forward and backward);
               peft (TRL + PEFT): the full [tokens, vocab] logits, ~12 B per entry (bf16 logits and their
               grad, fp32 log-softmax and its grad)
  reference    the reference pass (no grad, one layer live at a time); 0 when the pairs carry ref logps
               or they are precomputed. It runs before the policy pass, so the peak takes the larger of the two.
  overhead     CUDA context + allocator fragmentation: 1 GiB + 8% of the rest

Checked on an H200 (docs/benchmarks.md) with random-weight Qwen2.5 shapes, estimate at the longest row vs
measured peak: 7B batch 2 x 534 tokens 8.3 vs 7.5 (unsloth) and 9.1 vs 7.6 (peft); 14B batch 2 x 533 14.1
vs 13.6 (unsloth); 7B batch 8 x 1434 tokens 15.5 vs 13.3 (unsloth) and 28.6 vs 25.7 GiB (peft): 3-19% over,
never under. Before the peft logits term it said 15.5 for the last: the full logits are what make the plain
stack need ~2x Unsloth's memory at long batches.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import Config, ConfigError, add_config_args, config_from_args

log = logging.getLogger(__name__)

GIB = 2**30
NF4_BITS = 4.127  # 4-bit weights + double-quantized absmax scales per 64-weight block
BATCHES = (1, 2, 4, 8)
LOGIT_TILE_BYTES = 2 * 4096 * 32768 * 2  # forward + backward bf16 tile of a chunked log-prob kernel
FULL_LOGIT_BYTES = 2 + 2 + 4 + 4  # per [token, vocab] entry when the logits are materialized (peft backend)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    attention_head_dim: int = 0  # config.json's head_dim where it is not hidden / heads (Gemma 3)

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden // self.heads

    @property
    def linear_params(self) -> int:
        """Weights of the decoder layers' projections (what 4-bit quantizes)."""
        return self.layers * sum(i * o for i, o in self.module_dims().values())

    @property
    def embedding_params(self) -> int:
        """Input embeddings, plus the LM head when it is not tied to them."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        """Parameters, norms left out."""
        return self.linear_params + self.embedding_params

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @classmethod
    def from_config(cls, path: Path) -> ModelShape:
        c = json.loads(path.read_text())
        c = c.get("text_config", c)
        return cls(hidden=c["hidden_size"], layers=c["num_hidden_layers"], intermediate=c["intermediate_size"],
                   heads=c["num_attention_heads"], kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                   vocab=c["vocab_size"], tied_embeddings=bool(c.get("tie_word_embeddings", False)),
                   attention_head_dim=c.get("head_dim") or 0)


KNOWN_SHAPES = {
    "qwen2.5-32b": ModelShape(hidden=5120, layers=64, intermediate=27648, heads=40, kv_heads=8, vocab=152064),
    "qwen2.5-7b": ModelShape(hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4, vocab=152064),
    # the packaged models (gen_server.models), so that planning needs no prepared copy
    "smollm2-135m": ModelShape(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152,
                               tied_embeddings=True, attention_head_dim=64),
    "gemma3-270m": ModelShape(hidden=640, layers=18, intermediate=2048, heads=4, kv_heads=1, vocab=262144,
                              tied_embeddings=True, attention_head_dim=256),
}


def estimate(shape: ModelShape, *, batch: int, seq_len: int, lora_r: int, target_modules: list[str], bits: int,
             gradient_checkpointing: bool, reference_pass: bool, optim: str,
             backend: str = "unsloth") -> dict[str, float]:
    """Every term of the peak, in GiB, plus ``peak_gib``."""
    dims = shape.module_dims()
    weight_bytes = shape.linear_params * (NF4_BITS / 8 if bits == 4 else bits / 8) + shape.embedding_params * 2

    lora_params = shape.layers * sum(lora_r * (i + o) for m, (i, o) in dims.items() if m in target_modules)
    adapter_bytes = 2 if bits == 4 else 4
    optim_bytes = 2 if "8bit" in optim else 8
    lora_bytes = lora_params * (2 * adapter_bytes + optim_bytes)

    seqs = 2 * batch  # chosen + rejected in one forward
    tokens = seqs * seq_len
    # One layer's live activations (bf16): attention projections, MLP gate/up/act, LoRA intermediates.
    per_layer = tokens * (4 * shape.hidden + 2 * shape.kv_heads * shape.head_dim + 3 * shape.intermediate) * 2
    if gradient_checkpointing:
        act_bytes = shape.layers * tokens * shape.hidden * 2 + per_layer
    else:
        act_bytes = shape.layers * per_layer
    if backend == "peft":  # full logits: bf16 + grad, fp32 log-softmax + grad
        logits_bytes = tokens * shape.vocab * FULL_LOGIT_BYTES
        ref_logits = tokens * shape.vocab * (2 + 4)  # no grad
    else:
        logits_bytes = ref_logits = LOGIT_TILE_BYTES + tokens * 7 * 4  # tile + per-token fp32 softmax statistics
    ref_bytes = (per_layer + ref_logits) if reference_pass else 0.0

    fixed = weight_bytes + lora_bytes
    body = fixed + max(act_bytes + logits_bytes, ref_bytes)
    terms = {
        "weights_gib": weight_bytes / GIB,
        "lora_params_m": lora_params / 1e6,
        "lora_and_optimizer_gib": lora_bytes / GIB,
        "activations_gib": act_bytes / GIB,
        "logits_gib": logits_bytes / GIB,
        "reference_pass_gib": ref_bytes / GIB,
        "overhead_gib": (GIB + 0.08 * body) / GIB,
    }
    terms["peak_gib"] = body / GIB + terms["overhead_gib"]
    return terms


def planned_backend(requested: str) -> str:
    """The backend the estimate assumes: what :func:`trainer.models.pick_backend` picks on a GPU."""
    from trainer.models import pick_backend

    return pick_backend(requested, cuda=True)


def _estimate_for(cfg: Config, shape: ModelShape, batch: int, on_gpu: bool = True) -> dict[str, float]:
    t = cfg.train
    return estimate(shape, batch=batch, seq_len=t.max_length, lora_r=t.lora_r, target_modules=list(t.target_modules),
                    bits=4 if (t.load_in_4bit and on_gpu) else 16, gradient_checkpointing=t.gradient_checkpointing,
                    reference_pass=not t.precompute_ref_log_probs, optim=t.optim,
                    backend=planned_backend(t.backend))


def largest_fitting_batch(cfg: Config, base_model: Path | None = None, *, gpu_gib: float,
                          shape: ModelShape | None = None) -> int | None:
    """The largest of 1/2/4/8 whose estimated peak fits in ``gpu_gib``; None if not even 1 fits."""
    if shape is None:
        if base_model is None:
            raise ValueError("pass base_model or shape")
        shape = ModelShape.from_config(Path(base_model) / "config.json")
    fitting = [b for b in BATCHES if _estimate_for(cfg, shape, b)["peak_gib"] <= gpu_gib]
    return max(fitting, default=None)


def _shape_of_config(cfg: Any) -> tuple[ModelShape, str]:
    """The base model's shape from its config.json; a known shape by name when the files are not here
    (planning a GPU run from a laptop: model.base=/models/Qwen2.5-32B names the shape)."""
    from trainer.paths import resolve_base_model

    try:
        base = resolve_base_model(cfg)
        return ModelShape.from_config(base / "config.json"), str(base)
    except (FileNotFoundError, ValueError) as e:
        spec = cfg.train.base_model or cfg.model.base
        for name, shape in KNOWN_SHAPES.items():
            if Path(spec).name.lower().startswith(name):
                log.info("%s is not here; planning with the known %s shape", spec, name)
                return shape, f"{name} (known shape; {spec} not on this machine)"
        raise ValueError(f"{e}; or pass --shape {{{','.join(sorted(KNOWN_SHAPES))}}}") from None


def main(argv: list[str] | None = None) -> int:
    from shared.log import setup_logging

    parser = argparse.ArgumentParser(prog="python -m trainer.plan", description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--gpu-gib", type=float, default=None, help="GPU memory; default: this GPU's, else 80.")
    parser.add_argument("--shape", choices=sorted(KNOWN_SHAPES), help="Plan for a known model without its files.")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = config_from_args(args)
        if args.shape:
            shape, source = KNOWN_SHAPES[args.shape], args.shape
        else:
            shape, source = _shape_of_config(cfg)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        log.error("%s", e)
        return 2
    gpu_gib = args.gpu_gib
    if gpu_gib is None:
        import torch

        gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 80.0
    bs = cfg.train.per_device_train_batch_size
    batch = 1 if bs == "auto" else int(bs)
    if bs == "auto":
        batch = largest_fitting_batch(cfg, shape=shape, gpu_gib=gpu_gib) or 1
    terms: dict[str, Any] = _estimate_for(cfg, shape, batch)
    t = cfg.train
    print(f"model: {source} (hidden {shape.hidden}, layers {shape.layers}, intermediate {shape.intermediate}, "
          f"heads {shape.heads}/{shape.kv_heads} kv, vocab {shape.vocab})")
    print(f"setting: {planned_backend(t.backend)} backend, batch {batch} x accum {t.gradient_accumulation_steps}, "
          f"max_length {t.max_length}, "
          f"{'4-bit' if t.load_in_4bit else '16-bit'} base, LoRA r={t.lora_r} on {len(t.target_modules)} modules, "
          f"checkpointing {'on' if t.gradient_checkpointing else 'off'}, optim {t.optim}, GPU {gpu_gib:.0f} GiB")
    for k, v in terms.items():
        if k != "peak_gib":
            print(f"  {k}: {v:.2f}")
    for b in BATCHES:
        print(f"  batch {b}: peak {_estimate_for(cfg, shape, b)['peak_gib']:.1f} GiB")
    best = largest_fitting_batch(cfg, shape=shape, gpu_gib=gpu_gib)
    print(f"peak_gib: {terms['peak_gib']:.1f}")
    print(f"largest_batch: {best if best is not None else 'none'}")
    fits = terms["peak_gib"] <= gpu_gib
    print(f"fits: {'yes' if fits else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
