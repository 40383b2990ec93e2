"""Tiny randomly initialised models of the real architectures, made in the test: no files, no hub."""

from __future__ import annotations

from pathlib import Path

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Write a short poem about the sea. "
    "# Query: List three colors.\n# Answer: Red, green and blue.\n"
    "Answer in JSON. Use no commas. Respond in all lowercase letters. End with the phrase 'Is there anything else?'\n"
    "0123456789 {}[]:,.\"'-*#\n"
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def make_tiny_model(out_dir: str | Path, *, arch: str = "llama", chat_template: str | None = None, seed: int = 0) -> Path:
    """Save a tiny random Llama or Qwen2 model + tokenizer to ``out_dir`` and return it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out_dir = Path(out_dir)
    tok = make_tokenizer(chat_template)
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


# A tiny random model writes random bytes that rarely hit the template's stop strings, so pair-building tests
# use a template that stops at "e"/"a" (short, untruncated answers), a one-principle constitution with short
# examples (the real few-shot pages overflow the tiny context) and instructions without constraints.
TINY_PRINCIPLE = {"id": "short", "description": "d", "critique_request": "Is it good?", "revision_request": "Fix it.",
                  "examples": [{"query": "Say hi.", "answer": "HI", "critique": "Caps. Verdict: NEEDS REVISION",
                                "revision": "hi"}]}


def write_pair_assets(d: Path, instructions: list[str]) -> Path:
    """template.yaml, principles/short.yaml and instructions.jsonl in ``d`` (see TINY_PRINCIPLE)."""
    import json

    import yaml

    from shared.prompting import DEFAULT_TEMPLATE

    tpl = yaml.safe_load(DEFAULT_TEMPLATE.read_text())
    tpl["stop"] = ["e", "a", "\n# Query:"]
    (d / "template.yaml").write_text(yaml.safe_dump(tpl))
    (d / "principles").mkdir(exist_ok=True)
    (d / "principles" / "short.yaml").write_text(yaml.safe_dump(TINY_PRINCIPLE))
    (d / "instructions.jsonl").write_text("".join(json.dumps({"instruction": t}) + "\n" for t in instructions))
    return d


def ref_logps(model_dir: Path, rows: list[dict]) -> list[dict]:
    """Reference log-probs computed independently of TRL: sum of log p(response + eos | prompt)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for r in rows:
        n_prompt = len(tok(r["prompt"])["input_ids"])
        scores = {}
        for side in ("chosen", "rejected"):
            ids = torch.tensor([tok(r["prompt"] + r[side] + tok.eos_token)["input_ids"]])
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, 1:]
            scores[f"ref_{side}_logps"] = logp[n_prompt - 1 :].gather(-1, targets[n_prompt - 1 :, None]).sum().item()
        out.append({**r, **scores})
    return out
