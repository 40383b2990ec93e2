"""pair_builder tokens/s vs the same requests sent straight to the servers, and scaling over 1, 2, 4 servers.

    python bench/pair_builder_throughput.py [--servers 1 2 4] [--items-per-server 64] [--in-flight 8] \
        [--tokens-per-s 50] [--latency-ms 20] [--max-concurrency 64] [--repeats 1]

On CPU, against simulated generation servers (bench/sim_server.py, subprocesses on free loopback ports,
always stopped): for each N, N servers and ``items-per-server x N`` instructions (weak scaling), then

1. pair_builder: ``pair_builder.__main__.run(cfg)`` in this process, on an in-process ``ray.init(num_cpus=2)``,
   over a generated instruction file (no constraints, ``prefer_rewrite``, the repo's template and
   constitution), so each item sends the real mix: sample ``n=k``, critique, revision, reference scoring;
2. baseline: the request bodies the servers logged in step 1, replayed by a plain AsyncOpenAI client with
   ``in-flight`` requests per server (the same total concurrency, ``in-flight x N``), nothing else.

Tokens/s is measured on the servers' side (``/stats``): completion tokens over the window from the first
request's arrival to the last response, so Ray start-up, config checks and the report are left out (the
end-to-end wall time of ``run`` is printed beside it). The simulated text is deterministic per request, so
both sides produce the same tokens. The servers are latency-bound (``max-concurrency`` sequence slots
exceed the in-flight sequences), so any client-side overhead shows up in tokens/s. Targets: pair_builder /
baseline >= 0.9; pair_builder tokens/s at N servers >= 0.9 x N x its tokens/s at 1 server.
With ``--repeats R`` each measurement runs R times (pair_builder then baseline, on the same servers) and
the medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from gen_server.process import free_port
from pair_builder.__main__ import run
from shared.client import make_client, wait_for_health
from shared.config import load_config

SIM_SERVER = Path(__file__).resolve().parent / "sim_server.py"
VERBS = ["Write a short story about", "Describe", "Explain", "List facts about", "Give advice about",
         "Write a poem about", "Summarize the history of", "Compare", "Argue for", "Plan a day around"]
TOPICS = ["lighthouses", "glaciers", "bread baking", "chess openings", "city buses", "honeybees", "volcanoes",
          "public libraries", "night trains", "coral reefs", "paper maps", "jazz drummers", "desert plants",
          "wind turbines", "street markets", "owls", "bridges", "tea ceremonies", "comets", "old radios",
          "sailing", "rain gardens", "typewriters", "lanterns", "mountain huts", "tide pools"]
AUDIENCES = ["a child", "a busy engineer", "a retired teacher", "a first-year student", "a tourist",
             "a skeptical reader", "a chef", "a farmer"]


@dataclass
class Measurement:
    completion_tokens: int
    requests: int
    window_s: float  # first request arrival -> last response, over all servers
    wall_s: float  # the caller's wall time (for pair_builder: all of run(), start-up and report included)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.window_s


def _http(url: str, method: str = "GET") -> dict[str, Any]:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def sim_servers(n: int, logs: Path, args: argparse.Namespace) -> Iterator[list[str]]:
    """``n`` simulated servers on free loopback ports, each logging its requests to ``logs/<port>.jsonl``."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        urls = []
        for _ in range(n):
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, str(SIM_SERVER), "--port", str(port), "--tokens-per-s", str(args.tokens_per_s),
                 "--latency-ms", str(args.latency_ms), "--max-concurrency", str(args.max_concurrency),
                 "--log-requests", str(logs / f"{port}.jsonl")], stdout=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_for_health(url, timeout=60, interval=0.2)
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def reset(urls: list[str]) -> None:
    for u in urls:
        _http(u + "/reset", "POST")


def measure(urls: list[str], wall_s: float) -> Measurement:
    stats = [_http(u + "/stats") for u in urls]
    return Measurement(completion_tokens=sum(s["completion_tokens"] for s in stats),
                       requests=sum(s["requests"] for s in stats),
                       window_s=max(s["last_end"] for s in stats) - min(s["first_start"] for s in stats),
                       wall_s=wall_s)


def median(ms: list[Measurement]) -> Measurement:
    """The measurement with the median tokens/s (the lower middle one for an even count)."""
    return sorted(ms, key=lambda m: m.tokens_per_s)[(len(ms) - 1) // 2]


def write_instructions(path: Path, m: int) -> None:
    """``m`` distinct instructions without constraints (verb x topic x audience, interleaved)."""
    rows = [f"{VERBS[i % len(VERBS)]} {TOPICS[(i // len(VERBS)) % len(TOPICS)]} for "
            f"{AUDIENCES[(i // (len(VERBS) * len(TOPICS))) % len(AUDIENCES)]}." for i in range(m)]
    assert len(set(rows)) == m, "not enough distinct instructions; extend VERBS/TOPICS/AUDIENCES"
    path.write_text("".join(json.dumps({"id": f"bench-{i}", "instruction": r}) + "\n" for i, r in enumerate(rows)))


def run_pair_builder(urls: list[str], instructions: Path, out_root: Path, name: str,
                     args: argparse.Namespace) -> tuple[Measurement, dict[str, Any]]:
    cfg = load_config(None, [
        f"run.root={out_root}", f"run.name={name}", f"pairs.servers=[{','.join(urls)}]", "pairs.sources=[file]",
        # The generated rows share most words; 0.95 keeps MinHash from calling them near-duplicates.
        f"pairs.input_file={instructions}", "pairs.dedupe_threshold=0.95", "pairs.no_constraint_rule=prefer_rewrite",
        "pairs.k=2", "pairs.revisions=1", "pairs.max_tokens=128", "pairs.critique_max_tokens=64",
        f"pairs.in_flight_per_server={args.in_flight}", "pairs.eos_token=EOS", "pairs.progress=false",
        "cost.gpu_usd_per_hour=1.74",
    ])
    reset(urls)
    t0 = time.monotonic()
    rc = run(cfg)
    wall = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError(f"pair_builder exited with {rc}")
    stats = json.loads((out_root / name / "round-0" / "pairs" / ".meta" / "stats.json").read_text())
    return measure(urls, wall), stats


def logged_bodies(logs: Path, urls: list[str]) -> list[dict[str, Any]]:
    """The bodies the servers received, interleaved across servers (each log is in completion order)."""
    per_server = [[json.loads(x) for x in (logs / f"{u.rsplit(':', 1)[1]}.jsonl").read_text().splitlines()]
                  for u in urls]
    return [b for i in range(max(map(len, per_server))) for s in per_server if i < len(s) for b in [s[i]]]


async def _replay(urls: list[str], bodies: list[dict[str, Any]], in_flight: int) -> None:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    clients = [make_client(u, None, timeout=600, max_retries=2, asynchronous=True) for u in urls]

    async def worker(client: Any) -> None:
        while not queue.empty():
            body = dict(queue.get_nowait())
            # Unknown keys (return_tokens_as_token_ids) and all the rest go through unchanged.
            await client.completions.create(model=body.pop("model"), prompt=body.pop("prompt"), extra_body=body)

    # in_flight workers per server pulling from one queue = least-loaded dispatch, in_flight x N in flight.
    await asyncio.gather(*(worker(c) for c in clients for _ in range(in_flight)))
    for c in clients:
        await c.close()


def run_baseline(urls: list[str], bodies: list[dict[str, Any]], in_flight: int) -> Measurement:
    reset(urls)
    t0 = time.monotonic()
    asyncio.run(_replay(urls, bodies, in_flight))
    return measure(urls, time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--servers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--items-per-server", type=int, default=64)
    ap.add_argument("--in-flight", type=int, default=8, help="pairs.in_flight_per_server (and the baseline's)")
    ap.add_argument("--tokens-per-s", type=float, default=50.0, help="sim server: decode rate per sequence")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="sim server: fixed cost per request")
    ap.add_argument("--max-concurrency", type=int, default=64, help="sim server: sequence slots")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    rows: list[tuple[int, Measurement, Measurement]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pb-bench-") as tmp_dir:
            tmp = Path(tmp_dir)
            for n in args.servers:
                logs = tmp / f"logs-{n}"
                logs.mkdir()
                instructions = tmp / f"instructions-{n}.jsonl"
                write_instructions(instructions, args.items_per_server * n)
                pbs, bases = [], []
                with sim_servers(n, logs, args) as urls:
                    for r in range(args.repeats):
                        pb, stats = run_pair_builder(urls, instructions, tmp / "runs", f"n{n}-r{r}", args)
                        bodies = logged_bodies(logs, urls)
                        base = run_baseline(urls, bodies, args.in_flight)
                        if base.completion_tokens != pb.completion_tokens or base.requests != pb.requests:
                            raise RuntimeError(f"replay differs: {base} vs {pb}")
                        pbs.append(pb)
                        bases.append(base)
                        print(f"  N={n} repeat {r}: pair_builder {pb.tokens_per_s:.0f} tok/s "
                              f"({pb.requests} requests, {pb.completion_tokens} tokens, window {pb.window_s:.1f}s, "
                              f"run() {pb.wall_s:.1f}s, kept {stats['kept']}/{stats['items_done']}); "
                              f"baseline {base.tokens_per_s:.0f} tok/s (window {base.window_s:.1f}s, replay {base.wall_s:.1f}s)", flush=True)
                rows.append((n, median(pbs), median(bases)))
    finally:
        ray.shutdown()

    print(f"\nsim servers: {args.tokens_per_s:g} tok/s per sequence, {args.latency_ms:g} ms per request, "
          f"{args.max_concurrency} slots; pair_builder k=2, revisions=1, ref scoring, in_flight_per_server="
          f"{args.in_flight}; {args.items_per_server} items per server; medians of {args.repeats} repeat(s)")
    print(f"{'N':>2} {'pair_builder tok/s':>19} {'baseline tok/s':>15} {'ratio':>6} {'scaling':>8} {'target':>7}")
    one = next((pb.tokens_per_s for n, pb, _ in rows if n == 1), None)
    for n, pb, base in rows:
        ratio = pb.tokens_per_s / base.tokens_per_s
        scaling = f"{pb.tokens_per_s / one:.2f}x" if one else "-"
        print(f"{n:>2} {pb.tokens_per_s:>19.0f} {base.tokens_per_s:>15.0f} {ratio:>6.2f} {scaling:>8} "
              f"{0.9 * n:>6.1f}x")
    ok = all(pb.tokens_per_s / base.tokens_per_s >= 0.9 for _, pb, base in rows) and (
        one is None or all(pb.tokens_per_s >= 0.9 * n * one for n, pb, _ in rows))
    print("targets (ratio >= 0.9, scaling >= 0.9 x N):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
