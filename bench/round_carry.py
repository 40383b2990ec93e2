"""How much of a round's movement does the next round start from? Old scheme (a fresh LoRA on a re-loaded merge)
vs the cumulative adapter (round k's adapter kept over the original base's weights).

    python bench/round_carry.py --base BASE_DIR --adapter runs/NAME/round-0/adapter --merged runs/NAME/round-0/merged
        [--loads nf4,bf16] [--prompts 16]

Movement = mean next-token KL(base + adapter, 16-bit || base, 16-bit) on template-rendered prompts: what round k
taught. For each training-side load of the weights (``nf4``: bitsandbytes 4-bit, GPU only; ``bf16``), it prints
  * old:  KL(load(merged) || load(base))         - what a new LoRA on the re-loaded merge starts from
  * new:  KL(load(base) + adapter || load(base)) - what the continued adapter starts from
and each as a share of the movement (1.0 = the next round starts exactly where this one ended). Each load is compared
with its own base there; the ``gap`` columns compare directly with where round k ended: KL(policy, fp32 || the
next round's start), 0 = it starts exactly there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _load(model_dir: Path, load: str):
    import torch
    from transformers import AutoModelForCausalLM

    if load == "nf4":
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map={"": 0}).eval()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[load]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--merged", type=Path, required=True)
    ap.add_argument("--loads", default="nf4,bf16", help="comma list of nf4 | bf16 | fp32")
    ap.add_argument("--prompts", type=int, default=16, help="IFEval prompts rendered with the template")
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from eval.ifeval import load_ifeval_prompts
    from shared.prompting import load_template
    from trainer.merge import compare_distributions, next_token_logprobs

    loads = args.loads.split(",")
    if "nf4" in loads and not torch.cuda.is_available():
        print("nf4 needs a CUDA GPU (bitsandbytes); pass --loads bf16 on CPU", file=sys.stderr)
        return 2
    tpl = load_template()
    probes = [tpl.render(it["prompt"]) for it in load_ifeval_prompts()[: args.prompts]]
    tok = AutoTokenizer.from_pretrained(args.base)

    ref_base = _load(args.base, "fp32")
    base_lp = next_token_logprobs(ref_base, tok, probes)
    policy = PeftModel.from_pretrained(ref_base, args.adapter).eval()
    policy_lp = next_token_logprobs(policy, tok, probes)
    moved = compare_distributions(policy_lp, base_lp)["mean_kl"]
    del policy, ref_base
    kl = lambda a, b: compare_distributions(a, b)["mean_kl"]  # noqa: E731
    print(f"movement (fp32 base + adapter vs fp32 base): mean KL {moved:.4g} over {len(probes)} prompts")
    print("| load | old: re-loaded merge | share | gap to the policy | new: base + adapter | share | gap to the policy |")
    print("|---|---|---|---|---|---|---|")
    for load in loads:
        base = _load(args.base, load)
        lb = next_token_logprobs(base, tok, probes)
        new_lp = next_token_logprobs(PeftModel.from_pretrained(base, args.adapter).eval(), tok, probes)
        del base
        merged = _load(args.merged, load)
        old_lp = next_token_logprobs(merged, tok, probes)
        del merged
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        old, new = kl(old_lp, lb), kl(new_lp, lb)
        print(f"| {load} | {old:.4g} | {old / moved:.3f} | {kl(policy_lp, old_lp):.4g} | {new:.4g} | {new / moved:.3f} "
              f"| {kl(policy_lp, new_lp):.4g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
