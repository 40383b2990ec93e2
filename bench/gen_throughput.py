"""Generation throughput through our stack vs vLLM's own offline engine, on the same prompts and lengths.

    python bench/gen_throughput.py --model /tmp/m7b [--prompts 512] [--max-tokens 256] [--concurrency 512]
        [--prompts-per-request 1,8,32] [--fp8]

1. `python -m gen_server --backend vllm` serves the model (our launcher); the eval client's request path
   (`eval.run._fetch_all`: AsyncOpenAI, bounded concurrency, up to --prompts-per-request prompts per request,
   response cache) sends every prompt rendered with the base-model template, greedy, with the template's stop
   strings -> output tokens/s from `usage` (exact totals: a batch's usage sits on one of its cache entries).
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
from shared.config import EvalConfig
from shared.prompting import load_template

TASKS = Path(__file__).resolve().parent.parent / "constitution" / "seed_tasks.jsonl"


def prompts(n: int) -> list[dict]:
    tasks = [json.loads(x)["task"] for x in TASKS.read_text().splitlines() if x.strip()]
    # distinct prompts (a shared suffix would let prefix caching skip work the offline run also skips)
    return [{"key": f"p{i}", "prompt": f"{tasks[i % len(tasks)]} (Request {i}.)"} for i in range(n)]


def through_server(model: str, backend: str, passes: list[tuple[int, list[dict]]], s: EvalSettings,
                   concurrency: int, extra: list[str], log: Path) -> list[tuple[int, float, int]]:
    """One server start; each pass sends its own prompts (no full-prompt prefix-cache hits across passes) with
    its prompts-per-request value. Returns (prompts_per_request, wall_s, completion_tokens) per pass."""
    tpl = load_template()
    out = []
    with ServerProcess(model, backend=backend, extra_args=extra, log_path=log, health_timeout=900) as srv:
        client = make_client(srv.base_url, srv.api_key)
        name = client.models.list().data[0].id
        client.completions.create(model=name, prompt=[tpl.render(f"warm up {i}") for i in range(8)], max_tokens=16)
        for ppr, items in passes:
            reqs = []
            for it in items:
                req = _request(it, name, s, tpl)
                req["request_key"] = _request_key(req)
                reqs.append(req)
            with tempfile.TemporaryDirectory() as tmp:
                cache = ResponseCache(Path(tmp), {"bench": True})
                t0 = time.perf_counter()
                asyncio.run(_fetch_all(items, reqs, cache, base_urls=[srv.base_url], api_key=srv.api_key,
                                       concurrency=concurrency, timeout=600, max_retries=2, prompts_per_request=ppr))
                wall = time.perf_counter() - t0
                out.append((ppr, wall, sum(e["completion_tokens"] for e in cache.entries.values())))
    return out


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
    ap.add_argument("--prompts-per-request", default=str(EvalConfig.model_fields["prompts_per_request"].default),
                    help="comma list, e.g. 1,8,32: one pass each through the same server (1 = one prompt per request)")
    ap.add_argument("--fp8", action="store_true", help="also check that --quantization fp8 serves")
    ap.add_argument("--log-dir", default="/tmp")
    args = ap.parse_args()
    pprs = [int(v) for v in args.prompts_per_request.split(",")]
    n = args.prompts
    items = prompts(n * len(pprs))
    passes = [(ppr, items[i * n:(i + 1) * n]) for i, ppr in enumerate(pprs)]
    s = EvalSettings(max_tokens=args.max_tokens, temperature=0.0)
    log = Path(args.log_dir)
    served = through_server(args.model, args.backend, passes, s, args.concurrency, [], log / "bench-server.log")
    for ppr, wall, tok in served:
        print(f"server ({args.backend}) + eval client, {n} prompts, concurrency {args.concurrency}, {ppr} "
              f"prompts/request: {tok / wall:,.0f} output tok/s ({tok} tokens, {wall:.1f}s)", flush=True)
    if args.backend == "vllm":
        owall, otok = offline(args.model, passes[0][1], s)
        print(f"vllm offline LLM.generate, {n} prompts: {otok / owall:,.0f} output tok/s ({otok} tokens, {owall:.1f}s)")
        for ppr, wall, tok in served:
            print(f"ratio server/offline at {ppr} prompts/request: {(tok / wall) / (otok / owall):.3f}  (target >= 0.9)",
                  flush=True)
    if args.fp8:
        few = [(pprs[-1], passes[0][1][:64])]
        [(_, fwall, ftok)] = through_server(args.model, args.backend, few, s, args.concurrency,
                                            ["--quantization", "fp8"], log / "bench-server-fp8.log")
        print(f"fp8 server: served 64 prompts, {ftok / fwall:,.0f} output tok/s (incl. ramp)")

if __name__ == "__main__":
    main()
