"""Is this a BASE model? Evidence from its files, plus a behavioural probe through a server.

    python -m eval.base_check MODEL_DIR [--server URL --api-key K [--model NAME]]

Prints one line per piece of evidence (what it points to and why), then a last line
``verdict: BASE``, ``verdict: INSTRUCT`` or ``verdict: UNSURE``. No single clue decides: base models
often ship a chat template (Qwen2.5 base does), so the verdict weighs names, end-of-turn tokens,
sampling defaults and behaviour together. Reads JSON files only (no torch), so it runs anywhere.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared.modeldir import eos_token, read_json, token_str

log = logging.getLogger(__name__)

Verdict = Literal["BASE", "INSTRUCT", "UNSURE"]
_INSTRUCT_NAME = re.compile(r"(instruct|chat|[-_]it\b|[-_]it[-_.]|sft|dpo|rlhf|assistant|orpo)", re.I)
_BASE_NAME = re.compile(r"(\bbase\b|[-_]base\b|[-_]base[-_.]|pretrain)", re.I)
_TURN_END_TOKENS = {"<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eom_id|>", "<|assistant_end|>"}
_DOC_END_TOKENS = {"<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"}


@dataclass
class Evidence:
    points_to: Literal["BASE", "INSTRUCT"]
    weight: int
    reason: str

    @property
    def score(self) -> int:
        return self.weight if self.points_to == "INSTRUCT" else -self.weight


def file_evidence(model_dir: str | os.PathLike[str]) -> list[Evidence]:
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json: pass a Hugging Face model directory")
    config = read_json(d / "config.json")
    tok_cfg = read_json(d / "tokenizer_config.json")
    gen_cfg = read_json(d / "generation_config.json")
    manifest = read_json(d / "selfalign_model.json")
    ev: list[Evidence] = []

    names = [d.resolve().name, str(config.get("_name_or_path", "")), str(manifest.get("source", ""))]
    names = [n for n in names if n]
    hits = sorted({m.group(1) for n in names if (m := _INSTRUCT_NAME.search(n))})
    if hits:
        # weight 3: the most reliable clue; a weak instruct model can fail the behavioural probes
        ev.append(Evidence("INSTRUCT", 3, f"name marker {hits} in {names}"))
    elif any(_BASE_NAME.search(n) for n in names):
        ev.append(Evidence("BASE", 1, f"name says base/pretrained: {names}"))

    template = tok_cfg.get("chat_template") or (
        (d / "chat_template.jinja").read_text(encoding="utf-8") if (d / "chat_template.jinja").is_file() else None)
    if template:
        ev.append(Evidence("INSTRUCT", 1, "tokenizer has a chat template (weak: many base models ship one too)"))
    else:
        ev.append(Evidence("BASE", 1, "tokenizer has no chat template"))

    eos = token_str(tok_cfg.get("eos_token"))
    if eos in _TURN_END_TOKENS:
        ev.append(Evidence("INSTRUCT", 1, f"tokenizer eos is the end-of-turn token {eos!r}"))
    elif eos in _DOC_END_TOKENS:
        # weight 2: instruct tunes almost always switch eos to an end-of-turn token
        ev.append(Evidence("BASE", 2, f"tokenizer eos is the end-of-document token {eos!r}"))

    sampling = {k: gen_cfg[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
                if k in gen_cfg}
    if gen_cfg.get("do_sample") and ("temperature" in gen_cfg or "top_p" in gen_cfg):
        ev.append(Evidence("INSTRUCT", 1, f"generation_config sets chat sampling defaults {sampling}"))
    elif gen_cfg and not gen_cfg.get("do_sample", False):
        ev.append(Evidence("BASE", 1, "generation_config is greedy by default (no chat sampling defaults)"))
    return ev


HEALTH_TIMEOUT_S = 10.0


def probe_evidence(base_url: str, api_key: str | None, model: str | None, model_dir: Path) -> list[Evidence]:
    """Behaviour: does it answer a chat-formatted instruction and stop, or continue raw text as a document?"""
    from shared.client import make_client, served_models, wait_for_health

    wait_for_health(base_url, timeout=HEALTH_TIMEOUT_S)  # a dead port is a one-line error, not a traceback
    model = model or served_models(base_url, api_key)[0]["id"]
    client = make_client(base_url, api_key, timeout=120, max_retries=2)
    ev: list[Evidence] = []
    raw = client.completions.create(
        model=model, prompt="The following is a list of the largest cities in Europe by population:\n1.",
        max_tokens=24, temperature=0.0)
    text = raw.choices[0].text
    if re.match(r"\s*(sure|certainly|of course|here (is|are)|i'm|i am|as an ai)\b", text, re.I):
        ev.append(Evidence("INSTRUCT", 2, f"answers a raw document prefix like an assistant: {text[:60]!r}"))
    elif text.strip():
        ev.append(Evidence("BASE", 1, f"continues raw text as a document: {text[:60]!r}"))

    if eos_token(model_dir) == "<|im_end|>":
        prompt = ("<|im_start|>user\nReply with exactly one word: banana<|im_end|>\n<|im_start|>assistant\n")
        r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0.0)
        ans, fin = r.choices[0].text.strip().lower(), r.choices[0].finish_reason
        if "banana" in ans[:12] and fin == "stop":
            ev.append(Evidence("INSTRUCT", 2, f"follows a chat-formatted instruction and stops: {ans!r}"))
        elif fin == "length":
            ev.append(Evidence("BASE", 1, f"does not end its turn on a chat-formatted instruction: {ans!r}"))
    return ev


def verdict(evidence: list[Evidence]) -> Verdict:
    score = sum(e.score for e in evidence)
    if score >= 2:
        return "INSTRUCT"
    if score <= -2:
        return "BASE"
    return "UNSURE"


def check(model_dir: str | os.PathLike[str], *, server: str | None = None, api_key: str | None = None,
          model: str | None = None) -> tuple[Verdict, list[Evidence]]:
    ev = file_evidence(model_dir)
    if server:
        ev += probe_evidence(server, api_key, model, Path(model_dir))
    return verdict(ev), ev


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.base_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--server", help="also probe behaviour through this gen_server URL")
    ap.add_argument("--api-key", default=os.environ.get("GEN_SERVER_API_KEY"))
    ap.add_argument("--model", help="served model name (default: the first the server lists)")
    args = ap.parse_args(argv)
    import openai

    from shared.client import ServerUnavailable

    try:
        v, ev = check(args.model_dir, server=args.server, api_key=args.api_key, model=args.model)
    except (FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ServerUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except openai.APIError as e:
        print(f"error: the server at {args.server} did not answer the probe ({e}); start one with "
              f"`python -m gen_server --model {args.model_dir}`, or leave out --server for the file evidence only",
              file=sys.stderr)
        return 3
    for e in ev:
        print(f"  [{e.points_to:<8} {e.score:+d}] {e.reason}")
    print(f"verdict: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
