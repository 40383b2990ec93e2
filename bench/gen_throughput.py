"""Generation throughput through our stack vs vLLM's own offline engine, on the same prompts and lengths.

    python bench/gen_throughput.py --model /tmp/m7b [--prompts 512] [--max-tokens 256] [--concurrency 512] [--fp8]

1. `python -m gen_server --backend vllm` serves the model (our launcher); the eval client's request path
   (`eval.run._fetch_all`: AsyncOpenAI, bounded concurrency, response cache) sends every prompt rendered with
   the base-model template, greedy, with the template's stop strings -> output tokens/s from `usage`.
2. Baseline, same process after the server is gone: `vllm.LLM.generate` on the same prompts and sampling.
Prints both, their ratio (target >= 0.9) and, with --fp8, whether `--quantization fp8` serves.
`--backend embedded` runs step 1 only (a CPU dry run of the client path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from eval.run import EvalSettings, ResponseCache, _fetch_all, _request, _request_key
from gen_server.process import ServerProcess
from shared.client import make_client
from shared.prompting import load_template

TASKS = Path(__file__).resolve().parent.parent / "constitution" / "seed_tasks.jsonl"


def prompts(n: int) -> list[dict]:
    tasks = [json.loads(x)["task"] for x in TASKS.read_text().splitlines() if x.strip()]
    # distinct prompts (a shared suffix would let prefix caching skip work the offline run also skips)
    return [{"key": f"p{i}", "prompt": f"{tasks[i % len(tasks)]} (Request {i}.)"} for i in range(n)]


def through_server(model: str, backend: str, items: list[dict], s: EvalSettings, concurrency: int,
                   extra: list[str], log: Path) -> tuple[float, int]:
    tpl = load_template()
    with ServerProcess(model, backend=backend, extra_args=extra, log_path=log, health_timeout=900) as srv:
        client = make_client(srv.base_url, srv.api_key)
        name = client.models.list().data[0].id
        client.completions.create(model=name, prompt=[tpl.render(f"warm up {i}") for i in range(8)], max_tokens=16)
        reqs = []
        for it in items:
            req = _request(it, name, s, tpl)
            req["request_key"] = _request_key(req)
            reqs.append(req)
        with tempfile.TemporaryDirectory() as tmp:
            cache = ResponseCache(Path(tmp), {"bench": True})
            t0 = time.perf_counter()
            asyncio.run(_fetch_all(items, reqs, cache, base_url=srv.base_url, api_key=srv.api_key,
                                   concurrency=concurrency, timeout=600, max_retries=2))
            wall = time.perf_counter() - t0
            tokens = sum(e["completion_tokens"] for e in cache.entries.values())
    return wall, tokens


def offline(model: str, items: list[dict], s: EvalSettings) -> tuple[float, int]:
    from vllm import LLM, SamplingParams

    tpl = load_template()
    llm = LLM(model=model, dtype="bfloat16", seed=0, gpu_memory_utilization=0.9)
    sp = SamplingParams(temperature=s.temperature, max_tokens=s.max_tokens, stop=tpl.stop, seed=s.seed)
    llm.generate([tpl.render(f"warm up {i}") for i in range(8)], SamplingParams(max_tokens=16), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([tpl.render(it["prompt"]) for it in items], sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    return wall, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", default="vllm", choices=["vllm", "embedded"])
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=512)
    ap.add_argument("--fp8", action="store_true", help="also check that --quantization fp8 serves")
    ap.add_argument("--log-dir", default="/tmp")
    args = ap.parse_args()
    items = prompts(args.prompts)
    s = EvalSettings(max_tokens=args.max_tokens, temperature=0.0)
    log = Path(args.log_dir)
    wall, tok = through_server(args.model, args.backend, items, s, args.concurrency, [], log / "bench-server.log")
    print(f"server ({args.backend}) + eval client, concurrency {args.concurrency}: {tok / wall:,.0f} output tok/s "
          f"({tok} tokens, {wall:.1f}s)", flush=True)
    if args.backend == "vllm":
        owall, otok = offline(args.model, items, s)
        print(f"vllm offline LLM.generate: {otok / owall:,.0f} output tok/s ({otok} tokens, {owall:.1f}s)")
        print(f"ratio server/offline: {(tok / wall) / (otok / owall):.3f}  (target >= 0.9)", flush=True)
    if args.fp8:
        few = items[:64]
        fwall, ftok = through_server(args.model, args.backend, few, s, args.concurrency, ["--quantization", "fp8"],
                                     log / "bench-server-fp8.log")
        print(f"fp8 server: served {len(few)} prompts, {ftok / fwall:,.0f} output tok/s (64 prompts, incl. ramp)")


if __name__ == "__main__":
    main()
