"""Merge the round's LoRA adapter into the ORIGINAL 16-bit base and prove the merge changed nothing.

    python -m trainer.merge --config configs/demo-cpu.yaml [train.round=1 merge.dtype=bfloat16]

Loads the 16-bit base (never a 4-bit-dequantized one: merging into dequantized weights garbles outputs),
applies the adapter with PEFT, ``merge_and_unload``s, and saves safetensors + tokenizer + config +
generation config as a model dir that gen_server serves (``round-k/merged``, built under a temporary name
and renamed only after verification). Verification reloads the SAVED dir and compares its next-token
distributions on probe prompts with the adapter model's: mean/max KL(adapter || merged) and top-1
agreement, failing over ``merge.max_kl`` / under ``merge.min_top1`` (exit 1; the old dir is left as it was).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.atomic import atomic_dir, atomic_write_json
from shared.config import Config, ConfigError, add_config_args, config_from_args
from shared.ledger import CostLedger

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PROBE_POSITIONS = 64  # last positions of each probe prompt compared: a strong check at bounded memory
REPORT_NAME = "merge_report.json"


class MergeError(ValueError):
    """The adapter cannot be merged into this base; the message says why and what to do."""


class MergeVerificationError(RuntimeError):
    """The merged model's next-token distributions differ from the adapter model's."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_dtype(dtype: str) -> Any:
    import torch

    return "auto" if dtype == "auto" else getattr(torch, dtype)


def check_adapter_matches_base(base_dir: Path, adapter_dir: Path) -> None:
    """Refuse a quantized base, a missing adapter, and an adapter trained on a base of another shape."""
    from trainer.artifacts import base_fingerprint
    from trainer.models import other_base

    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeError(f"no adapter in {adapter_dir} (adapter_config.json missing); run the round's trainer "
                         "(`python -m trainer.dpo --config CFG`, or trainer.sft) first or set merge.adapter_dir")
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"base model dir {base_dir} has no config.json; set merge.base_model to the 16-bit model dir")
    if "quantization_config" in json.loads((base_dir / "config.json").read_text()):
        raise MergeError(f"{base_dir} is a quantized checkpoint; merge into the ORIGINAL 16-bit weights (set "
                         "merge.base_model to the 16-bit dir the round started from)")
    if trained_on := other_base(adapter_dir, base_dir):
        raise MergeError(f"adapter {adapter_dir} was trained on a base shaped {trained_on}, but {base_dir} is "
                         f"{base_fingerprint(base_dir)}; merge it into the model it was trained on")


def next_token_logprobs(model: Any, tokenizer: Any, prompts: list[str]) -> list[torch.Tensor]:
    """Float32 log-softmax over the vocabulary at the last :data:`PROBE_POSITIONS` positions of each prompt."""
    import torch

    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"][:, -2048:].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, -PROBE_POSITIONS:]
            out.append(logits.float().log_softmax(-1).cpu())
    return out


def compare_distributions(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict[str, float]:
    """Mean/max KL(reference || candidate) per position and the share of positions with the same top-1 token."""
    import torch

    ref, cand = torch.cat(reference), torch.cat(candidate)
    kl = (ref.exp() * (ref - cand)).sum(-1).clamp(min=0.0)
    top1 = (ref.argmax(-1) == cand.argmax(-1)).float()
    return {"positions": int(ref.shape[0]), "mean_kl": kl.mean().item(), "max_kl": kl.max().item(),
            "top1_agreement": top1.mean().item()}


def _load_adapter_model(base_dir: Path, adapter_dir: Path, dtype: str) -> tuple[Any, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_adapter_matches_base(base_dir, adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=_torch_dtype(dtype)).to(_device())
    try:
        model = PeftModel.from_pretrained(base, adapter_dir)
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise MergeError(f"adapter {adapter_dir} does not fit base {base_dir} ({e}); merge it into the model "
                             "it was trained on") from e
        raise
    return model.eval(), AutoTokenizer.from_pretrained(base_dir)


def adapter_effect(model: Any, tok: Any, probe_prompts: list[str], reference: list[torch.Tensor]) -> float:
    """Mean KL(adapter model || the same base with the adapter disabled) on the probes."""
    with model.disable_adapter():
        bare = next_token_logprobs(model, tok, probe_prompts)
    return compare_distributions(reference, bare)["mean_kl"]


def _judge(result: dict[str, float], max_kl: float, min_top1: float, effect_kl: float) -> dict[str, Any]:
    """Pass when merged and adapter models agree within 16-bit rounding AND the merge carries the adapter.

    ``effect_kl`` is KL(adapter || base without adapter): what the adapter changes. Rounding the merged weights
    to bf16 costs a little KL on its own (measured 0.0018 mean on SmolLM2-135M), so the absolute bound alone
    cannot tell a merge that dropped the adapter from a correct one when the adapter's effect is small; the
    merge must also be at least twice as close to the adapter model as the bare base is.
    """
    carries = effect_kl == 0.0 or result["mean_kl"] <= 0.5 * effect_kl
    passed = result["mean_kl"] <= max_kl and result["top1_agreement"] >= min_top1 and carries
    return {**result, "adapter_effect_kl": effect_kl, "max_kl_allowed": max_kl, "min_top1": min_top1,
            "carries_adapter": carries, "passed": passed}


def _raise_unless_passed(verdict: dict[str, Any], merged_dir: Path) -> None:
    log.info("merge check on %d positions: mean KL %.3g, max KL %.3g, top-1 agreement %.4f (the adapter itself "
             "moves the base by KL %.3g) -> %s", verdict["positions"], verdict["mean_kl"], verdict["max_kl"],
             verdict["top1_agreement"], verdict["adapter_effect_kl"], "ok" if verdict["passed"] else "FAILED")
    if not verdict["passed"]:
        raise MergeVerificationError(
            f"merged model {merged_dir} disagrees with the adapter model: mean KL {verdict['mean_kl']:.3g} (max "
            f"allowed {verdict['max_kl_allowed']:.3g}), top-1 agreement {verdict['top1_agreement']:.4f} (min "
            f"{verdict['min_top1']}), {'carries' if verdict['carries_adapter'] else 'does NOT carry'} the adapter's "
            f"effect (KL {verdict['adapter_effect_kl']:.3g} from the base). Merge again from the ORIGINAL 16-bit base (merge.base_model), or use "
            "merge.dtype=float32 if bf16 rounding is the cause",
            verdict,
        )


def verify_merged(base_dir: str | Path, adapter_dir: str | Path, merged_dir: str | Path, *, probe_prompts: list[str],
                  dtype: str = "auto", max_kl: float = 1e-2, min_top1: float = 0.98) -> dict[str, Any]:
    """Compare an existing merged dir with base + adapter; raises :class:`MergeVerificationError` on mismatch."""
    from transformers import AutoModelForCausalLM

    model, tok = _load_adapter_model(Path(base_dir), Path(adapter_dir), dtype)
    reference = next_token_logprobs(model, tok, probe_prompts)
    effect = adapter_effect(model, tok, probe_prompts, reference)
    del model
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=_torch_dtype(dtype)).to(_device()).eval()
    candidate = next_token_logprobs(merged, tok, probe_prompts)
    verdict = _judge(compare_distributions(reference, candidate), max_kl, min_top1, effect)
    _raise_unless_passed(verdict, Path(merged_dir))
    return verdict


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "auto",
                  probe_prompts: list[str], max_kl: float = 1e-2, min_top1: float = 0.98) -> dict[str, Any]:
    """Merge ``adapter_dir`` into the 16-bit ``base_dir``, save it to ``out_dir`` atomically, verify it.

    ``probe_prompts`` are full prompt strings (already rendered with the template). Returns the verification
    result (also saved as ``out_dir/merge_report.json``); raises :class:`MergeVerificationError` and leaves
    ``out_dir`` untouched when the saved merge disagrees with the adapter model.
    """
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if not probe_prompts:
        raise ConfigError(["merge.probe_prompts: need at least one prompt to verify the merge"])
    model, tok = _load_adapter_model(base_dir, adapter_dir, dtype)
    reference = next_token_logprobs(model, tok, probe_prompts)
    effect = adapter_effect(model, tok, probe_prompts, reference)
    merged = model.merge_and_unload()
    del model
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)  # safetensors, config.json, generation_config.json
        tok.save_pretrained(tmp)
        del merged  # verify what was written, not what is in memory
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=_torch_dtype(dtype)).to(_device()).eval()
        verdict = _judge(compare_distributions(reference, next_token_logprobs(reloaded, tok, probe_prompts)),
                         max_kl, min_top1, effect)
        del reloaded
        verdict.update(base_model=str(base_dir), adapter=str(adapter_dir), dtype=dtype)
        _raise_unless_passed(verdict, out_dir)
        atomic_write_json(tmp / REPORT_NAME, verdict)
    log.info("merged model -> %s", out_dir)
    return verdict


def merge_for_config(cfg: Config) -> dict[str, Any]:
    """:func:`merge_adapter` with the paths and thresholds of ``cfg`` (round ``cfg.train.round``)."""
    from shared.prompting import load_template
    from trainer.paths import resolve_base_model, resolve_train_paths

    m = cfg.merge
    paths = resolve_train_paths(cfg)
    base = Path(m.base_model) if m.base_model else resolve_base_model(cfg)
    adapter = Path(m.adapter_dir) if m.adapter_dir else paths.adapter_dir
    out = Path(m.output_dir) if m.output_dir else paths.round_dir.merged
    template = load_template(cfg.model.template)
    ledger = CostLedger(paths.round_dir.ledger, usd_per_hour=cfg.cost.gpu_usd_per_hour)
    with ledger.stage("merge", base_model=str(base), adapter=str(adapter)):
        probes = [template.render(p) for p in m.probe_prompts]
        return merge_adapter(base, adapter, out, dtype=m.dtype, probe_prompts=probes, max_kl=m.max_kl,
                             min_top1=m.min_top1)


def main(argv: list[str] | None = None) -> int:
    from shared.log import setup_logging

    parser = argparse.ArgumentParser(prog="python -m trainer.merge", description=__doc__.split("\n")[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        verdict = merge_for_config(config_from_args(args))
    except MergeVerificationError as e:
        log.error("%s", e)
        return 1
    except (ConfigError, MergeError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    print(f"mean_kl: {verdict['mean_kl']:.3g}  max_kl: {verdict['max_kl']:.3g}  top1: {verdict['top1_agreement']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
