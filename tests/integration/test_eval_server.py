"""eval against the REAL embedded server (tiny random model): run, resume from cache, refuse a foreign
cache, CLI exit codes for gate / wrong key / unreachable server / bad suite file, compare."""

import json
import subprocess
import sys

import pytest

from eval.run import EvalError, EvalSettings, run_eval
from gen_server.process import ServerProcess, free_port

pytestmark = pytest.mark.integration
S = EvalSettings(max_tokens=12)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(tiny_model_dir, served_model_name="tiny",
                       log_path=tmp_path_factory.mktemp("log") / "server.log", health_timeout=120) as srv:
        yield srv


def _cli(*args, env_key=None):
    return subprocess.run([sys.executable, "-m", "eval", *args], capture_output=True, text=True, timeout=300)


def test_run_resume_and_refuse_foreign_cache(server, tmp_path):
    out = tmp_path / "ev"
    s1 = run_eval(base_url=server.base_url, model="tiny", api_key=server.api_key, suite="own", limit=6,
                  out_dir=out, settings=S, concurrency=4)
    assert s1["n_prompts"] == 6 and 0.0 <= s1["prompt_loose"] <= 1.0 and s1["model"] == "tiny"
    assert s1["completion_tokens"] > 0
    for f in ("scores.json", "results.jsonl", "report.md", "by_category.png", "responses.jsonl"):
        assert (out / f).exists(), f
    # an interrupted eval: drop two cached responses; the rerun asks only for those
    lines = (out / "responses.jsonl").read_text().splitlines()
    (out / "responses.jsonl").write_text("\n".join(lines[:4]) + "\n")
    s2 = run_eval(base_url=server.base_url, model="tiny", api_key=server.api_key, suite="own", limit=6,
                  out_dir=out, settings=S, concurrency=4)
    assert len((out / "responses.jsonl").read_text().splitlines()) == 6
    assert {k: s2[k] for k in ("prompt_strict", "instruction_loose")} == {k: s1[k] for k in ("prompt_strict", "instruction_loose")}
    with pytest.raises(EvalError, match="another eval"):
        run_eval(base_url=server.base_url, model="tiny", api_key=server.api_key, suite="own", limit=6,
                 out_dir=out, settings=EvalSettings(max_tokens=13))
    with pytest.raises(EvalError, match="serves"):
        run_eval(base_url=server.base_url, model="nope", api_key=server.api_key, suite="own", limit=2,
                 out_dir=tmp_path / "x", settings=S)


def test_cli_gate_compare_and_errors(server, tmp_path):
    a = tmp_path / "a"
    r = _cli("--server", server.base_url, "--api-key", server.api_key, "--suite", "own", "--limit", "4",
             "--max-tokens", "8", "--prompts-per-request", "3", "--out", str(a), "--gate", "1.01")
    assert r.returncode == 1, r.stderr
    assert "gate failed" in r.stderr and (a / "scores.json").exists()
    assert sorted({json.loads(x)["batch"] for x in (a / "responses.jsonl").read_text().splitlines()}) == [1, 3]
    r = _cli("compare", str(a), str(a))
    assert r.returncode == 0 and "within noise" in r.stdout
    r = _cli("--server", server.base_url, "--api-key", "wrong", "--limit", "2", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "API key" in r.stderr
    url = f"http://127.0.0.1:{free_port()}"
    r = subprocess.run([sys.executable, "-c", f"import sys; from eval.run import run_eval; run_eval(base_url='{url}', "
                        f"model=None, api_key=None, out_dir='{tmp_path / 'c'}', health_timeout=1)"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "python -m gen_server" in r.stderr and url in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
                   + "\n{oops\n")
    r = _cli("--server", server.base_url, "--api-key", server.api_key, "--suite", str(bad), "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and "line 2" in r.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = _cli("--server", server.base_url, "--api-key", server.api_key, "--suite", str(empty), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "no prompts" in r.stderr


@pytest.mark.parametrize("settings", [S, EvalSettings(max_tokens=12, temperature=0.8, seed=3)], ids=["greedy", "seeded"])
def test_batched_requests_give_the_same_cache_and_results(server, tmp_path, settings):
    """Prompts sent as lists of 4 get exactly the responses they get one per request, token totals included;
    a cache made one way serves the other (prompts_per_request is not part of what the cache is for)."""
    outs = {}
    for ppr in (1, 4):
        out = tmp_path / f"ppr{ppr}"
        scores = run_eval(base_url=server.base_url, model="tiny", api_key=server.api_key, suite="own", limit=10,
                          out_dir=out, settings=settings, concurrency=8, prompts_per_request=ppr)
        entries = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
        outs[ppr] = scores, entries, (out / "results.jsonl").read_text()
    (s1, e1, r1), (s4, e4, r4) = outs[1], outs[4]
    assert {e["batch"] for e in e1} == {1} and sorted({e["batch"] for e in e4}) == [2, 4]

    def by_key(entries):
        return {e["request_key"]: (e["key"], e["response"], e["finish_reason"]) for e in entries}

    assert by_key(e4) == by_key(e1) and len(e4) == 10
    assert r4 == r1
    assert s4["completion_tokens"] == s1["completion_tokens"] == sum(e["completion_tokens"] for e in e1) > 0
    assert sum(e["prompt_tokens"] for e in e4) == sum(e["prompt_tokens"] for e in e1)
    assert {k: v for k, v in s4.items() if k != "generation_wall_s"} == {k: v for k, v in s1.items()
                                                                        if k != "generation_wall_s"}
    again = run_eval(base_url=server.base_url, model="tiny", api_key=server.api_key, suite="own", limit=10,
                     out_dir=tmp_path / "ppr1", settings=settings, concurrency=8, prompts_per_request=4)
    assert len((tmp_path / "ppr1" / "responses.jsonl").read_text().splitlines()) == 10
    assert again["completion_tokens"] == s1["completion_tokens"]
