"""Continuous vs static batching: the engine under staggered arrivals, like the pair builder's traffic.

    python bench/engine_batching.py [--model smollm2-135m] [--requests 24] [--spread-s 4] [--repeats 2]

Loads the model twice in one process: the current `gen_server.engine` (continuous batching) and, as the
baseline, `gen_server/engine.py` as committed at --baseline-ref (HEAD) imported from git into a temp module.
After a short warm-up of each, both get the same workload, in alternating runs so background load hits both
alike: `--requests` prompts of 300-700 tokens, max_tokens 64-128, temperature 0.7 with a seed each, a third
of them with stop strings that may end them early, submitted at random times over `--spread-s` seconds.

Prints for each run: wall time (first submit to last completion), completion tokens/s, the engine's stats,
seconds spent in prefill and in decode forwards, and rows decoded (the baseline's finished rows decoding
padding included); then the new/baseline throughput ratio (medians), and how many completions are identical
across engines (seeded rows should not depend on their batch mates; float rounding of batched matmuls can
rarely flip a token).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from types import ModuleType

from gen_server import engine as new_engine
from gen_server.models import resolve_model

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the", "model", "writes", "a", "short", "answer", "about", "rivers", "mountains", "cities", "history", "science",
    "music", "and", "food", "while", "critic", "reads", "it", "carefully", "then", "suggests", "one", "clear",
    "improvement", "so", "next", "draft", "is", "more", "precise", "helpful",
)
STOPS = ("\n\n", ".")


def load_baseline(ref: str) -> ModuleType:
    """The engine module as committed at `ref`, importable next to the current one."""
    source = subprocess.run(
        ["git", "show", f"{ref}:gen_server/engine.py"], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "engine_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("engine_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def make_workload(tokenizer, n: int, spread_s: float, seed: int) -> list[tuple[float, list[int], dict]]:
    """(arrival time, prompt ids, SamplingParams kwargs) per request, sorted by arrival."""
    rng = random.Random(seed)
    workload = []
    for i in range(n):
        length = rng.randint(300, 700)
        text = " ".join(rng.choice(WORDS) for _ in range(length))
        ids = tokenizer(f"Document {i}: {text}")["input_ids"][: length - 12]
        ids += tokenizer("\nSummarize the document in one paragraph:\n")["input_ids"]
        params = {"max_tokens": rng.randint(64, 128), "temperature": 0.7, "seed": 1000 + i}
        if i % 3 == 0:
            params["stop"] = STOPS
        workload.append((rng.uniform(0, spread_s), ids, params))
    return sorted(workload, key=lambda w: w[0])


def time_forwards(engine) -> dict[str, float]:
    """Wrap the engine's model forward to add up prefill and decode seconds and the rows decoded per step."""
    totals = {"prefill_s": 0.0, "decode_s": 0.0, "decoded_rows": 0}
    forward = engine.model.forward

    def timed_forward(*args, input_ids, **kwargs):
        t0 = time.perf_counter()
        out = forward(*args, input_ids=input_ids, **kwargs)
        cache = kwargs.get("past_key_values")  # after the call: a decode step's cache holds more than its input
        decode = cache is not None and cache.get_seq_length() > input_ids.shape[1]
        totals["decode_s" if decode else "prefill_s"] += time.perf_counter() - t0
        if decode:
            totals["decoded_rows"] += input_ids.shape[0]  # includes the baseline's finished rows decoding padding
        return out

    engine.model.forward = timed_forward
    return totals


def run_once(engine, module: ModuleType, workload, totals: dict[str, float]) -> tuple[float, list, dict]:
    """Submit on schedule from a thread; returns (wall seconds, completions in workload order, counters)."""
    futures: list[Future] = [None] * len(workload)
    before_totals = dict(totals)
    before = engine.stats()
    start = time.perf_counter()

    def submitter() -> None:
        for i, (at, ids, params) in enumerate(workload):
            time.sleep(max(0.0, start + at - time.perf_counter()))
            futures[i] = engine.submit(ids, module.SamplingParams(**params))

    thread = threading.Thread(target=submitter)
    thread.start()
    thread.join()
    results = [f.result() for f in futures]
    wall = time.perf_counter() - start
    after = engine.stats()
    counters = ("batches_run", "sequences_run", "decode_steps", "busy_s")
    delta = {k: round(after[k] - before[k], 1) for k in counters if k in after}
    delta.update({k: round(totals[k] - before_totals[k], 1) for k in totals})
    delta["max_batch_seen"] = after["max_batch_seen"]
    return wall, results, delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--spread-s", type=float, default=4.0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-ref", default="HEAD")
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    baseline = load_baseline(args.baseline_ref)
    engines = {
        "baseline": (baseline, baseline.Engine(model_dir, max_batch_size=args.max_batch_size)),
        "new": (new_engine, new_engine.Engine(model_dir, max_batch_size=args.max_batch_size)),
    }
    workload = make_workload(engines["new"][1].tokenizer, args.requests, args.spread_s, args.seed)
    prompt_tokens = [len(ids) for _, ids, _ in workload]
    print(f"{args.requests} requests over {args.spread_s:.1f}s, prompt tokens {min(prompt_tokens)}-"
          f"{max(prompt_tokens)} (mean {statistics.mean(prompt_tokens):.0f}), max_batch_size {args.max_batch_size}")
    rates: dict[str, list[float]] = {"baseline": [], "new": []}
    outputs: dict[str, list] = {}
    try:
        for module, engine in engines.values():  # warm-up: the first forwards of a process are much slower
            warm = [engine.submit(ids, module.SamplingParams(max_tokens=8)) for _, ids, _ in workload[:2]]
            [f.result() for f in warm]
        totals = {name: time_forwards(engine) for name, (_, engine) in engines.items()}
        for rep in range(args.repeats):
            for name, (module, engine) in engines.items():
                wall, results, stats = run_once(engine, module, workload, totals[name])
                tokens = sum(len(r.token_ids) for r in results)
                stopped = sum(r.finish_reason == "stop" for r in results)
                rates[name].append(tokens / wall)
                outputs[name] = results
                print(f"[{rep}] {name:8s} wall {wall:6.1f}s  {tokens} completion tokens  {tokens / wall:6.1f} tok/s"
                      f"  ({stopped} stopped early)  stats {stats}", flush=True)
    finally:
        for _, engine in engines.values():
            engine.close()
    same = sum(a.token_ids == b.token_ids for a, b in zip(outputs["baseline"], outputs["new"]))
    new, old = statistics.median(rates["new"]), statistics.median(rates["baseline"])
    print(f"new      {new:.1f} completion tok/s (median of {args.repeats})")
    print(f"baseline {old:.1f} completion tok/s (median of {args.repeats})")
    print(f"ratio    {new / old:.2f}x; identical completions {same}/{len(workload)}")


if __name__ == "__main__":
    main()
