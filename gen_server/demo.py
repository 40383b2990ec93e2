"""The CPU demo of the serving side (what `make demo` runs until the full pipeline lands).

Prepares the packaged demo model, starts the embedded OpenAI-compatible server as a child process on a
free loopback port with a fresh API key, sends a few instructions through the base-model few-shot
template with the openai client, prints the answers and the server-reported token usage, and stops the
server.

    python -m gen_server.demo [--model smollm2-135m] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from gen_server.process import ServerProcess
from shared.client import make_client
from shared.log import setup_logging
from shared.prompting import load_template

log = logging.getLogger("gen_server.demo")

INSTRUCTIONS = [
    "Name three primary colors. Answer in one sentence.",
    "Write a two-line poem about the sea. Do not use any commas.",
    "Explain in one sentence why the sky looks blue.",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="Model dir or packaged model name.")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--log", default="runs/demo/gen_server.log", help="Where the server's log goes.")
    args = ap.parse_args(argv)
    setup_logging()

    from gen_server.models import resolve_model  # prepares the packaged model once (cached)

    model_dir = resolve_model(args.model)
    template = load_template()
    with ServerProcess(model_dir, backend="embedded", log_path=Path(args.log)) as srv:
        client = make_client(srv.base_url, srv.api_key)
        name = client.models.list().data[0].id
        t0 = time.perf_counter()
        # One request with a list of prompts: the server decodes them as one batch.
        resp = client.completions.create(
            model=name,
            prompt=[template.render(i) for i in INSTRUCTIONS],
            max_tokens=args.max_tokens,
            temperature=0.0,
            stop=template.stop,
        )
        wall = time.perf_counter() - t0
        for ins, choice in sorted(zip(INSTRUCTIONS, resp.choices), key=lambda x: x[1].index):
            print(f"\n# Query: {ins}\n# Answer: {choice.text.strip()}\n  (finish: {choice.finish_reason})")
        u = resp.usage
        print(
            f"\nserved by {name} at {srv.base_url}: {u.prompt_tokens} prompt + {u.completion_tokens} completion "
            f"tokens in {wall:.1f}s ({u.completion_tokens / wall:.1f} completion tok/s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
