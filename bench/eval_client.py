"""Is the eval client the bottleneck? Eval prompts/s through the embedded server vs the same engine in-process.

    python bench/eval_client.py [--model smollm2-135m] [--prompts 32] [--max-tokens 64] [--concurrency 16]

Runs `eval` (own suite, base template, greedy) against a real embedded server and reads the server's own
busy time from /stats; then generates the same prompts with the same settings on the engine in-process
(no HTTP, no client) as the baseline. Prints both rates, their ratio, and the client overhead: the share of
the eval's wall time the server sat idle waiting for the client (target < 5%).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path

from eval.run import EvalSettings, load_suite, run_eval
from gen_server.models import resolve_model
from gen_server.process import ServerProcess
from shared.prompting import load_template


def _stats(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/stats") as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    model_dir = resolve_model(args.model)
    settings = EvalSettings(max_tokens=args.max_tokens, temperature=0.0)
    tpl = load_template()

    with tempfile.TemporaryDirectory() as tmp, ServerProcess(
        model_dir, extra_args=["--max-batch-size", str(args.concurrency)], log_path=Path(tmp) / "server.log"
    ) as srv:
        before = _stats(srv.base_url)
        t0 = time.perf_counter()
        scores = run_eval(base_url=srv.base_url, model=None, api_key=srv.api_key, suite="own", limit=args.prompts,
                          out_dir=Path(tmp) / "eval", settings=settings, template=tpl, concurrency=args.concurrency)
        wall = time.perf_counter() - t0
        after = _stats(srv.base_url)
    busy = after["busy_s"] - before["busy_s"]

    from gen_server.engine import Engine, SamplingParams

    _, items = load_suite("own", args.prompts)
    engine = Engine(model_dir, max_batch_size=args.concurrency)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop=tuple(tpl.stop), seed=0)
    engine.submit(tpl.render("warm up"), SamplingParams(max_tokens=2, temperature=0.0)).result()
    t0 = time.perf_counter()
    futures = [engine.submit(tpl.render(it["prompt"]), params) for it in items]
    base_tokens = sum(len(f.result().token_ids) for f in futures)
    base_wall = time.perf_counter() - t0
    engine.close()

    n = scores["n_prompts"]
    print(f"eval through server : {n / wall:.2f} prompts/s  ({wall:.1f}s wall, {scores['completion_tokens']} tokens; "
          f"server busy {busy:.1f}s)")
    print(f"engine in-process   : {n / base_wall:.2f} prompts/s  ({base_wall:.1f}s wall, {base_tokens} tokens)")
    print(f"ratio server/engine : {base_wall / wall:.3f}")
    print(f"client overhead     : {100 * (wall - busy) / wall:.1f}% of eval wall time the server waited (target < 5%)")


if __name__ == "__main__":
    main()
