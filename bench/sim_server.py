"""A simulated OpenAI-compatible generation server for CPU benchmarks of the client side (pair_builder).

    python bench/sim_server.py --port 8100 --tokens-per-s 50 --latency-ms 20 --max-concurrency 64 \
        [--log-requests /tmp/sim-8100.jsonl]

It answers what pair_builder sends to gen_server - ``/health``, ``/v1/models`` (with ``root``) and
``/v1/completions`` (``n`` choices, ``max_tokens``, ``stop``, ``echo`` + ``logprobs`` + ``max_tokens=0``
scoring with ``return_tokens_as_token_ids``, ``usage``) - without a model and without burning CPU:

* text is deterministic in (prompt, seed, choice index): plain lowercase words, one token per word, between
  1/4 and 3/4 of ``max_tokens`` long (so it ends with ``finish_reason="stop"``, never truncated); a prompt
  ending in ``# Critique:`` gets a critique ending with ``Verdict: NEEDS REVISION``; text is cut at the
  first stop string. So pair_builder keeps pairs under ``no_constraint_rule=prefer_rewrite``, and a replay
  of the same request body produces the same tokens.
* latency of a batched GPU server: a request holds one sequence slot per choice (at most
  ``--max-concurrency`` slots in use at once) for ``latency_ms + longest choice / tokens_per_s`` (an
  ``asyncio.sleep``), so the capacity is ``max_concurrency x tokens_per_s`` completion tokens/s.
* ``GET /stats``: requests, prompt and completion tokens, and the time window (first request start, last
  response end, ``time.time()``) since start or the last ``POST /reset``. A single-prompt ``max_tokens=0``
  request is a health probe (pair_builder's echo check at connect): answered, but not counted or logged,
  so the window covers only the work. ``--log-requests`` appends every counted request body as JSONL (for
  replay); ``POST /reset`` also truncates that log.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

MODEL = "sim"
ROOT = "/sim/model"  # pair_builder uses /v1/models' root as the model revision
WORDS = ["the", "a", "river", "stone", "light", "garden", "quiet", "morning", "city", "bright", "simple", "clear",
         "answer", "small", "green", "road", "music", "window", "paper", "story", "friend", "careful", "steady",
         "warm", "open", "list", "short", "plan", "reason", "example", "detail", "kind", "useful", "water", "field",
         "north", "winter", "summer", "idea", "method", "result", "step", "point", "gentle", "fair", "honest", "good"]
CRITIQUE = ("The answer follows the query only in part; it could be more specific and better organized. "
            "Verdict: NEEDS REVISION")


def _rng(*parts: Any) -> random.Random:
    """A stable RNG (Python's hash() is salted per process; replays must produce the same text)."""
    return random.Random(hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest())


def _cut(text: str, stop: list[str]) -> str:
    ends = [i for s in stop if (i := text.find(s)) >= 0]
    return text[: min(ends)] if ends else text


def generate(prompt: str, seed: int | None, index: int, max_tokens: int, stop: list[str]) -> str:
    """Deterministic completion text of 1/4..3/4 of max_tokens words (a critique for a critique page)."""
    rng = _rng(prompt, seed, index)
    n = rng.randint(max(1, max_tokens // 4), max(1, 3 * max_tokens // 4))
    if prompt.rstrip().endswith("# Critique:"):
        tail = CRITIQUE.split()
        words = [rng.choice(WORDS) for _ in range(max(0, n - len(tail)))] + tail
    else:
        words = [rng.choice(WORDS) for _ in range(n)]
    return _cut(" ".join(words), stop)


def token_id(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big") % 50000


def score(text: str, as_ids: bool) -> dict[str, Any]:
    """Echo log-probs: one token per whitespace-separated word, the first token's log-prob None."""
    tokens, offsets, lps = [], [], []
    pos = 0
    for word in text.split():
        pos = text.index(word, pos)
        tid = token_id(word)
        tokens.append(f"token_id:{tid}" if as_ids else word)
        offsets.append(pos)
        lps.append(-0.5 - (tid % 17) / 10)
        pos += len(word)
    if lps:
        lps[0] = None
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None, "text_offset": offsets}


class Slots:
    """A weighted semaphore over sequence slots: a request with n choices holds n of them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self.cond = asyncio.Condition()

    async def acquire(self, n: int) -> int:
        n = min(n, self.capacity)
        async with self.cond:
            await self.cond.wait_for(lambda: self.free >= n)
            self.free -= n
        return n

    async def release(self, n: int) -> None:
        async with self.cond:
            self.free += n
            self.cond.notify_all()


class Stats:
    def __init__(self) -> None:
        self.requests = self.prompt_tokens = self.completion_tokens = 0
        self.first_start: float | None = None
        self.last_end: float | None = None

    def add(self, start: float, end: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.first_start = start if self.first_start is None else min(self.first_start, start)
        self.last_end = end if self.last_end is None else max(self.last_end, end)


FAULTS = ("stall", "error", "garbage")


def create_app(*, tokens_per_s: float, latency_ms: float, max_concurrency: int,
               log_requests: Path | None = None, fault: str | None = None, fault_after: int = 0) -> FastAPI:
    """``fault`` (for fault-injection tests): after ``fault_after`` completion requests, every further one
    ``stall``s (never answers), answers HTTP 500 (``error``), or answers 200 with a body that is not JSON
    (``garbage``). /health and /v1/models keep answering."""
    app = FastAPI()
    state: dict[str, Any] = {"slots": None, "stats": Stats(), "seen": 0}  # Slots binds to the loop: made lazily
    if log_requests is not None:
        log_requests.write_text("")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "sim", "root": ROOT}]}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return vars(state["stats"])

    @app.post("/reset")
    async def reset() -> dict[str, str]:
        state["stats"] = Stats()
        if log_requests is not None:
            log_requests.write_text("")
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        start = time.time()
        body = await request.json()
        state["seen"] += 1
        if fault is not None and state["seen"] > fault_after:
            if fault == "stall":
                await asyncio.sleep(3600)
            if fault == "error":
                return JSONResponse({"error": {"message": "injected fault"}}, status_code=500)
            return Response("this is not JSON", media_type="application/json")
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        n = int(body.get("n") or 1)
        max_tokens = 16 if body.get("max_tokens") is None else int(body["max_tokens"])  # OpenAI's default
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        echo_scoring = bool(body.get("echo")) and max_tokens == 0
        probe = echo_scoring and isinstance(body["prompt"], str)
        choices, lengths = [], []
        for p_i, prompt in enumerate(prompts):
            for c_i in range(n):
                index = p_i * n + c_i
                if echo_scoring:
                    text, logprobs = prompt, score(prompt, bool(body.get("return_tokens_as_token_ids")))
                    lengths.append(0)
                else:
                    text, logprobs = generate(prompt, body.get("seed"), c_i, max_tokens, stop), None
                    lengths.append(len(text.split()))
                choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": "stop"})
        if state["slots"] is None:
            state["slots"] = Slots(max_concurrency)
        held = await state["slots"].acquire(len(choices))
        try:
            # The choices decode in parallel (one batch): the longest one sets the time.
            await asyncio.sleep(latency_ms / 1000 + max(lengths) / tokens_per_s)
        finally:
            await state["slots"].release(held)
        usage = {"prompt_tokens": sum(len(p.split()) for p in prompts), "completion_tokens": sum(lengths)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not probe:
            state["stats"].add(start, time.time(), usage["prompt_tokens"], usage["completion_tokens"])
            if log_requests is not None:
                with log_requests.open("a") as f:
                    f.write(json.dumps(body) + "\n")
        return JSONResponse({"id": f"cmpl-{int(start * 1e6)}", "object": "text_completion", "created": int(start),
                             "model": body.get("model", MODEL), "choices": choices, "usage": usage})

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tokens-per-s", type=float, default=50.0, help="decode rate of one sequence")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="fixed cost per request (prefill, scheduling)")
    ap.add_argument("--max-concurrency", type=int, default=64, help="sequence slots decoded at once")
    ap.add_argument("--log-requests", type=Path, default=None, help="append counted request bodies here (JSONL)")
    ap.add_argument("--fault", choices=FAULTS, default=None, help="fault injection (see create_app)")
    ap.add_argument("--fault-after", type=int, default=0, help="completion requests answered before the fault")
    a = ap.parse_args()
    app = create_app(tokens_per_s=a.tokens_per_s, latency_ms=a.latency_ms, max_concurrency=a.max_concurrency,
                     log_requests=a.log_requests, fault=a.fault, fault_after=a.fault_after)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
