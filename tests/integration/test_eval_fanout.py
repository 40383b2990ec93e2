"""eval over two REAL embedded servers (tiny random model), started as the pipeline starts its replicas: both get
requests and the results are a one-server run's; one killed mid-eval leaves the other to finish, every prompt
answered exactly once."""

import json
import os
import signal

import pytest

from eval import run
from eval.run import EvalSettings, run_eval
from gen_server.process import start_replicas, stop_all
from shared.config import load_config

pytestmark = pytest.mark.integration
S = EvalSettings(max_tokens=12)


@pytest.fixture
def replicas(tiny_model_dir, tmp_path):
    """Two servers of the tiny model (one API key), stopped in teardown whatever the test did to them."""
    cfg = load_config(None, ["server.backend=embedded", "server.replicas=2", "server.served_model_name=tiny",
                             "server.max_model_len=2048", "server.health_timeout_s=120"])
    servers = start_replicas(cfg.server, tiny_model_dir, lambda i: tmp_path / f"server-{i}.log")
    try:
        yield servers
    finally:
        stop_all(servers)


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]


def _eval(servers, out, limit: int, **kw) -> dict:
    return run_eval(base_urls=[s.base_url for s in servers], model=None, api_key=servers[0].api_key, suite="own",
                    limit=limit, out_dir=out, settings=S, concurrency=2, prompts_per_request=1, **kw)


def test_both_replicas_serve_and_the_results_are_one_servers(replicas, tmp_path):
    both = _eval(replicas, tmp_path / "both", 16)
    rows = _rows(tmp_path / "both")
    assert len(rows) == len({r["request_key"] for r in rows}) == 16 == both["n_prompts"]
    assert {r["server"] for r in rows} == {s.base_url for s in replicas}
    posts = [s.log_path.read_text().count("POST /v1/completions") for s in replicas]
    assert all(n > 0 for n in posts) and sum(posts) == 16, posts
    one = _eval(replicas[:1], tmp_path / "one", 16)
    assert (tmp_path / "both" / "results.jsonl").read_text() == (tmp_path / "one" / "results.jsonl").read_text()
    assert {k: v for k, v in both.items() if k != "generation_wall_s"} == {
        k: v for k, v in one.items() if k != "generation_wall_s"}


def test_a_replica_killed_mid_eval_leaves_the_other_to_finish(replicas, tmp_path, monkeypatch, caplog):
    """SIGKILL of the second server once 4 answers are in: its in-flight prompts fail after the retries and go to
    the first; the eval completes with every prompt scored exactly once."""
    victim = replicas[1]
    add = run.ResponseCache.add

    def add_then_kill(cache, *entries):
        add(cache, *entries)
        if len(cache.entries) >= 4 and victim.proc.poll() is None:
            os.killpg(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait()

    monkeypatch.setattr(run.ResponseCache, "add", add_then_kill)
    scores = _eval(replicas, tmp_path / "ev", 20, max_retries=1, timeout=30)
    rows = _rows(tmp_path / "ev")
    assert len(rows) == len({r["request_key"] for r in rows}) == 20 == scores["n_prompts"]
    results = [json.loads(x) for x in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 20
    by_server = {s.base_url: sum(r["server"] == s.base_url for r in rows) for s in replicas}
    assert by_server[victim.base_url] < 4 < by_server[replicas[0].base_url], by_server
    assert f"dropping {victim.base_url}" in caplog.text
