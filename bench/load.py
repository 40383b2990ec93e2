"""Bounded load: the embedded server under 64 concurrent clients, and pair_builder's memory with a long queue.

    python bench/load.py server [--model smollm2-135m] [--clients 64] [--seconds 60] [--max-tokens 16]
    python bench/load.py queue [--small 1000] [--large 10000]

``server``: a real embedded server; first one client for ``--seconds`` / 4 (the baseline), then ``--clients``
clients for ``--seconds``, each sending completion requests back to back. Prints requests served and failed,
requests/s for both and their ratio, and the server's RSS after warm-up, after the baseline and after the load
(flat memory: the ratio stays near 1).

``queue``: pair_builder (real Ray, in-process) against the simulated server (bench/sim_server.py), fed
``--small`` and then ``--large`` queued instructions; prints the driver's peak RSS for both and their ratio.
pair_builder streams its items through Ray and writes pairs shard by shard, so ten times the queue should cost
far less than ten times the memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hammer(url: str, key: str, clients: int, seconds: float, max_tokens: int) -> tuple[int, int, list[str]]:
    import openai

    ok = failed = 0
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(i: int) -> None:
        nonlocal ok, failed
        c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
        n = 0
        while time.monotonic() < stop_at:
            try:
                c.completions.create(model="m", prompt=f"Client {i} request {n}: the weather today is",
                                     max_tokens=max_tokens, temperature=0.7, seed=n)
                with lock:
                    ok += 1
            except Exception as e:  # noqa: BLE001 - counted and shown, that is the measurement
                with lock:
                    failed += 1
                    errors.append(f"{type(e).__name__}: {str(e)[:120]}")
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ok, failed, errors


def server(args: argparse.Namespace) -> None:
    from gen_server.models import resolve_model
    from gen_server.process import ServerProcess

    model = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(model, served_model_name="m", log_path=Path(tmp) / "s.log",
                                                             health_timeout=300) as srv:
        pid = srv.proc.pid
        hammer(srv.base_url, srv.api_key, 4, 5, args.max_tokens)  # warm-up
        rss0 = rss_mb(pid)
        base_s = args.seconds / 4
        ok1, failed1, _ = hammer(srv.base_url, srv.api_key, 1, base_s, args.max_tokens)
        rss1 = rss_mb(pid)
        ok, failed, errors = hammer(srv.base_url, srv.api_key, args.clients, args.seconds, args.max_tokens)
        rss2 = rss_mb(pid)
    r1, rn = ok1 / base_s, ok / args.seconds
    print(f"model {args.model}, max_tokens {args.max_tokens}, embedded server (max_batch_size 16)")
    print(f"baseline  1 client  for {base_s:.0f} s: {ok1} ok, {failed1} failed, {r1:.2f} req/s")
    print(f"load     {args.clients} clients for {args.seconds:.0f} s: {ok} ok, {failed} failed, {rn:.2f} req/s "
          f"(ratio {rn / r1:.2f}x)")
    print(f"server RSS: {rss0:.0f} MB after warm-up, {rss1:.0f} MB after the baseline, {rss2:.0f} MB after the load "
          f"(ratio {rss2 / rss0:.3f})")
    for e in sorted(set(errors))[:5]:
        print("  error:", e)


def _queue_run(n: int, url: str, tmp: Path) -> tuple[float, float, int]:
    """One pair_builder process over ``n`` instructions: (peak RSS MB, wall s, items done)."""
    ins = tmp / f"ins-{n}.jsonl"
    ins.write_text("".join(json.dumps({"id": f"q{i}", "instruction": f"Describe item number {i} of the catalogue "
                                       f"in {3 + i % 5} sentences for reader {i * 7919 % 10007}."}) + "\n"
                           for i in range(n)))
    code = f"""
import resource, sys, time, json
sys.path.insert(0, {str(REPO)!r})
from pair_builder.__main__ import run
from shared.config import load_config
cfg = load_config(None, ["run.root={tmp / 'runs'}", "run.name=q{n}", "pairs.servers=[{url}]", "pairs.sources=[file]",
    "pairs.input_file={ins}", "pairs.no_constraint_rule=prefer_rewrite", "pairs.k=2", "pairs.max_tokens=16",
    "pairs.critique_max_tokens=16", "pairs.eos_token=EOS", "pairs.progress=false", "pairs.in_flight_per_server=64",
    "pairs.dedupe_threshold=0.95", "pairs.audit_sample=0"])
t0 = time.monotonic()
rc = run(cfg)
print(json.dumps({{"rc": rc, "wall": time.monotonic() - t0,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if not line.startswith("{"):
        raise RuntimeError(r.stderr[-3000:])
    out = json.loads(line)
    done = len((tmp / "runs" / f"q{n}" / "round-0" / "pairs" / ".meta" / "done.jsonl").read_text().splitlines())
    return out["peak_mb"], out["wall"], done


def queue(args: argparse.Namespace) -> None:
    from gen_server.process import free_port
    from shared.client import wait_for_health

    port = free_port()
    sim = subprocess.Popen([sys.executable, str(REPO / "bench" / "sim_server.py"), "--port", str(port),
                            "--tokens-per-s", "100000", "--latency-ms", "1", "--max-concurrency", "256"])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, timeout=60)
        with tempfile.TemporaryDirectory() as tmp:
            small = _queue_run(args.small, url, Path(tmp))
            large = _queue_run(args.large, url, Path(tmp))
    finally:
        sim.kill()
        sim.wait()
    print(f"pair_builder driver, simulated server: {args.small} instructions -> peak RSS {small[0]:.0f} MB "
          f"({small[2]} items in {small[1]:.0f} s); {args.large} -> {large[0]:.0f} MB ({large[2]} items in "
          f"{large[1]:.0f} s); memory ratio {large[0] / small[0]:.2f} for {args.large / args.small:.0f}x the queue")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--clients", type=int, default=64)
    s.add_argument("--seconds", type=float, default=60.0)
    s.add_argument("--max-tokens", type=int, default=16)
    q = sub.add_parser("queue")
    q.add_argument("--small", type=int, default=1000)
    q.add_argument("--large", type=int, default=10000)
    args = ap.parse_args()
    server(args) if args.cmd == "server" else queue(args)


if __name__ == "__main__":
    _ = resource  # the queue runs read their own peak RSS (resource.getrusage) in the child
    main()
