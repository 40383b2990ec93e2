"""pair_builder end to end: REAL embedded server (tiny random model) + REAL Ray (in-process, and a
`ray start --head` cluster via `ray job submit`); resume, SIGKILL midway, bad input.

A tiny random model writes random bytes that rarely hit the template's stop strings, so these tests use a
template that stops at "e" (short, untruncated answers), a one-principle constitution with short examples
(the tiny tokenizer needs ~1 token per 2 chars; the real few-shot pages overflow its 2048 context) and
instructions without constraints under the `prefer_rewrite` rule, so that many pairs survive and the
plumbing - done log, shards, ids, counts - can be asserted exactly.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
import urllib.request
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import ray

from gen_server.process import ServerProcess, free_port
from pair_builder.extras import extras_counts
from pair_builder.__main__ import run
from shared.config import load_config
from shared.records import is_extra
from tests.tiny import write_pair_assets

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
# the `ray` CLI of the interpreter running the tests (CI calls .venv/bin/python without activating the venv)
RAY = str(Path(sys.executable).with_name("ray"))
TOPICS = ["rain", "snow", "the sea", "a cat", "a dog", "autumn leaves", "city lights", "mountains at dawn",
          "a quiet library", "a busy market", "an old bridge", "a lighthouse", "a desert road", "a violin",
          "a garden in spring", "a thunderstorm", "a train station", "a chess game"]
VERBS = ["Write a haiku about", "Describe", "List three facts about", "Tell a short story about", "Explain the sound of",
         "Give advice about visiting", "Compare two views of", "Write a limerick about", "Summarize a day near"]
INSTRUCTIONS = [f"{v} {t}." for v in VERBS for t in TOPICS][::5]



@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(tiny_model_dir, served_model_name="tiny", log_path=tmp_path_factory.mktemp("log") / "s.log",
                       health_timeout=120) as srv:
        yield srv


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_pair_assets(tmp_path_factory.mktemp("assets"), INSTRUCTIONS)


def overrides(server, assets, root, name, *extra):
    return [f"run.root={root}", f"run.name={name}", f"pairs.servers=[{server.base_url}]",
            f"pairs.api_key={server.api_key}", "pairs.sources=[file]", f"pairs.input_file={assets / 'instructions.jsonl'}",
            f"pairs.constitution={assets / 'principles'}", f"model.template={assets / 'template.yaml'}",
            "pairs.no_constraint_rule=prefer_rewrite", "pairs.max_length_ratio=1000", "pairs.min_edit_distance=0",
            # random text is unrelated to the task and to itself: the quality filters for real models are off here
            "pairs.max_edit_distance=1", "pairs.min_task_overlap=null",
            "pairs.max_tokens=12", "pairs.critique_max_tokens=12", "pairs.shard_size=4", "pairs.progress=false",
            "cost.gpu_usd_per_hour=1.74", *extra]


def pairs_dir(root, name):
    return Path(root) / name / "round-0" / "pairs"


def check_output(d: Path, n_instructions: int) -> list[dict]:
    """Every item done exactly once, drops add up, shards load with datasets, no duplicate ids."""
    done = [json.loads(x) for x in (d / ".meta" / "done.jsonl").read_text().splitlines()]
    assert len({e["id"] for e in done}) == len(done) == n_instructions
    stats = json.loads((d / ".meta" / "stats.json").read_text())
    assert stats["kept"] + sum(stats["drop_reasons"].values()) == stats["items_done"] == n_instructions
    ds = datasets.load_dataset("parquet", data_files=[str(p) for p in d.glob("shard-*.parquet")], split="train")
    assert len(set(ds["id"])) == len(ds) == stats["kept"] == sum(e["kept"] for e in done)
    everything = datasets.load_dataset("parquet", data_dir=str(d), split="train")  # what the trainer reads
    extras = everything.filter(lambda r: is_extra(r["principle_id"]))
    assert len(everything) == len(ds) + len(extras) and not set(extras["id"]) & set(ds["id"])
    assert set(ds["id"]) == {e["id"] for e in done if e["kept"]}
    assert {"prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"} <= set(ds.column_names)
    assert all(isinstance(x, float) and x < 0 for x in ds["ref_chosen_logps"])
    return done


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_in_process_build_then_resume_does_nothing(server, assets, tmp_path, local_ray):
    cfg = load_config(None, overrides(server, assets, tmp_path, "a", "pairs.stop_pairs=1.0"))
    assert run(cfg) == 0
    d = pairs_dir(tmp_path, "a")
    done = check_output(d, len(INSTRUCTIONS))
    kept = sum(e["kept"] for e in done)
    assert kept >= 16, f"only {kept} pairs kept; drops: {[e['reason'] for e in done if not e['kept']]}"
    # extra pairs: every item's candidates in its done entry, as many stop pairs as checker pairs at most
    pool = Counter(x["kind"] for e in done for x in e.get("extras") or ())
    summary = json.loads((d / ".meta" / "stats.json").read_text())["run"]["extras"]
    assert summary["candidates"] == dict(pool) and summary["written"] == extras_counts(d)
    assert extras_counts(d).get("stop", 0) == min(pool["stop"], kept)
    print("extra-pair candidates", dict(pool), "written", extras_counts(d))
    assert {e["route"] for e in done if e["kept"]} == {"rewrite"}
    card = (d / "README.md").read_text()
    assert "tiny" in card and "Drop reasons" in card and "cost" in card
    for png in ("lengths.png", "pass_rates.png", "drop_reasons.png", "instruction_lengths.png"):
        assert (d / ".meta" / png).stat().st_size > 1000
    shards = {p.name: p.stat().st_mtime_ns for p in d.glob("*.parquet")}

    assert run(cfg) == 0  # resubmission: nothing left to do
    ledger = [json.loads(x) for x in (tmp_path / "a" / "round-0" / "ledger.jsonl").read_text().splitlines()]
    assert ledger[0]["requests"] > 0 and ledger[-1].get("requests", 0) == 0
    assert {p.name: p.stat().st_mtime_ns for p in d.glob("*.parquet")} == shards
    check_output(d, len(INSTRUCTIONS))


def test_round_1_stops_when_the_run_s_budget_is_spent(server, assets, tmp_path, local_ray):
    """The budget covers the whole run. Round 0 recorded $100; round 1's pair building, which costs C in full,
    gets a budget of $100 + C/2: it stops about halfway, cleanly (exit 0, its shards flushed, nothing done
    twice), where a per-round account would have let it spend $100 and finish every item."""
    def build(name: str, *extra: str) -> tuple[list[dict], list[dict]]:
        r0 = tmp_path / name / "round-0"
        r0.mkdir(parents=True)
        (r0 / "ledger.jsonl").write_text(json.dumps({"stage": "train", "status": "ok", "wall_s": 3600.0,
                                                     "usd_per_hour": 0.1, "cost_usd": 100.0}) + "\n")
        cfg = load_config(None, overrides(server, assets, tmp_path, name, "pairs.round=1", "pairs.shard_size=1",
                                          "pairs.in_flight_per_server=1", "cost.gpu_usd_per_hour=36", *extra))
        assert run(cfg) == 0
        rd = tmp_path / name / "round-1"
        return ([json.loads(x) for x in (rd / "pairs" / ".meta" / "done.jsonl").read_text().splitlines()],
                [json.loads(x) for x in (rd / "ledger.jsonl").read_text().splitlines()])

    done, ledger = build("full")
    assert len(done) == len(INSTRUCTIONS)
    full = ledger[0]["cost_usd"]
    done, ledger = build("half", f"cost.budget_usd={100.0 + full / 2}")
    assert 0 < len(done) < len(INSTRUCTIONS) and len({e["id"] for e in done}) == len(done)
    assert [e["stage"] for e in ledger] == ["pairs"] and 100.0 + ledger[0]["cost_usd"] >= 100.0 + full / 2


def test_sigkill_midway_then_resubmit_is_exact(server, assets, tmp_path, local_ray):
    args = overrides(server, assets, tmp_path, "k", "pairs.shard_size=1", "pairs.in_flight_per_server=1",
                     "pairs.ray_address=local")
    d = pairs_dir(tmp_path, "k")
    proc = subprocess.Popen([sys.executable, "-m", "pair_builder", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        done_log = d / ".meta" / "done.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if done_log.exists() and len(done_log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the build finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    partial = len(done_log.read_text().splitlines())
    assert 3 <= partial < len(INSTRUCTIONS)
    assert run(load_config(None, args[:-1])) == 0  # resubmit (on this test's Ray)
    check_output(d, len(INSTRUCTIONS))
    rows = sum(pq.read_metadata(p).num_rows for p in d.glob("shard-*.parquet"))
    assert rows == len({r for p in d.glob("shard-*.parquet") for r in pq.read_table(p).column("id").to_pylist()})


@pytest.fixture
def ray_head(tmp_path_factory):
    """A real `ray start --head` on non-default ports, in its own process group (stopped by its id)."""
    port, dash = free_port(), free_port()
    temp = Path("/tmp") / f"pbray{port}"  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # loopback-only test head
    log = tmp_path_factory.mktemp("head") / "head.log"
    with open(log, "wb") as f:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--port", str(port), "--dashboard-port", str(dash),
             "--num-cpus", "2", "--dashboard-host", "127.0.0.1", "--disable-usage-stats", "--temp-dir", str(temp),
             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
             "--min-worker-port", "0", "--max-worker-port", "0"],
            cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"Ray dashboard did not start at {url}: {log.read_text()[-500:]}")
                time.sleep(0.5)
        yield url, env
    finally:
        # `ray stop --force` would kill every Ray process of this user; stop only this head's process group.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()


def test_ray_job_submit_against_a_head(server, assets, tmp_path, ray_head):
    url, env = ray_head
    args = overrides(server, assets, tmp_path, "j", "pairs.max_pairs=4", "pairs.in_flight_per_server=2")
    out = subprocess.run([RAY, "job", "submit", "--address", url, "--", sys.executable, "-m", "pair_builder", *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    d = pairs_dir(tmp_path, "j")
    kept = datasets.load_dataset("parquet", data_dir=str(d), split="train")
    assert 4 <= len(kept) <= 4 + 2  # stops dispatching at max_pairs; items already in flight still finish


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pair_builder", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_bad_input(server, assets, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    out = _cli(*overrides(server, assets, tmp_path, "x", f"pairs.servers=[{url}]", "pairs.health_timeout_s=1"))
    assert out.returncode == 3 and url in out.stderr and "gen_server" in out.stderr
    out = _cli(*overrides(server, assets, tmp_path, "x", "pairs.k=1", "pairs.revisions=0", "pairs.colour=red"))
    assert out.returncode == 2 and "pairs.colour: unknown key" in out.stderr
    out = _cli(*overrides(server, assets, tmp_path, "x", "pairs.k=1", "pairs.revisions=0"))
    assert out.returncode == 2 and "gives one candidate" in out.stderr
    # an output dir holding another model's pairs is refused before any generation request
    meta = pairs_dir(tmp_path, "x") / ".meta"
    meta.mkdir(parents=True)
    (meta / "manifest.json").write_text(json.dumps({"model_revision": "another-model"}))
    out = _cli(*overrides(server, assets, tmp_path, "x"))
    assert out.returncode == 2 and "Refusing to mix" in out.stderr


def _workers_and_settings(server, assets, tmp_path, urls):
    from pair_builder.__main__ import build_settings
    from pair_builder.actors import start_workers
    from pair_builder.settings import check_config

    cfg = load_config(None, overrides(server, assets, tmp_path, "w", f"pairs.servers=[{','.join(urls)}]"))
    checked = check_config(cfg)
    settings = build_settings(cfg, "tiny", "rev")
    workers = start_workers(urls, server.api_key, in_flight=2, max_restarts=3, timeout=60, max_retries=2,
                            settings=settings, template=checked.template, constitution=checked.constitution)
    return cfg, checked, workers


def test_two_servers_balanced_and_a_killed_actor_is_redone(server, assets, tmp_path, local_ray):
    from pair_builder.actors import Job, run_jobs
    from pair_builder.sources import file_instructions

    # two URLs for the one test server: two workers, each with its own in-flight budget
    urls = [server.base_url, server.base_url.replace("127.0.0.1", "localhost")]
    _, checked, workers = _workers_and_settings(server, assets, tmp_path, urls)
    instructions = file_instructions(assets / "instructions.jsonl")[:8]
    jobs = [Job("build", (ins.to_json(), "short"), ins.id) for ins in instructions]
    results = []

    def on_result(job, res):
        results.append(res)
        if len(results) == 1:  # lose an actor with work in flight: Ray restarts it and reruns its tasks
            ray.kill(workers[0], no_restart=False)

    failures = run_jobs(workers, jobs, in_flight=2, on_result=on_result)
    assert failures == 0 and len(results) == len(jobs)
    assert all(r["error"] is None for r in results)
    assert len({r["instruction_id"] for r in results}) == len(jobs)
    assert {r["server"] for r in results} == set(urls)


def test_self_instruct_requests_go_through_the_workers(server, assets, tmp_path, local_ray):
    from pair_builder.__main__ import _self_instruct

    cfg, _, workers = _workers_and_settings(server, assets, tmp_path, [server.base_url])
    cfg.pairs.self_instruct_tasks = 4
    usage = {}
    tasks = _self_instruct(cfg, workers, usage)
    assert usage["requests"] >= 1 and usage["completion_tokens"] > 0
    assert isinstance(tasks, list) and len(tasks) <= 4  # random text mostly fails the task filter


def test_the_local_ray_it_starts_refuses_a_wrong_token():
    from pair_builder.actors import init_ray

    assert not ray.is_initialized()
    init_ray(None)
    try:
        gcs = ray.get_runtime_context().gcs_address
        token = (Path.home() / ".ray" / "auth_token")
        assert oct(token.stat().st_mode & 0o777) == "0o600"
        code = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); print('CONNECTED')"
        results = {}
        for name, value in (("wrong", "0" * 32), ("right", token.read_text().strip())):
            env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": value}
            r = subprocess.run([sys.executable, "-c", code, gcs], env=env, capture_output=True, text=True, timeout=180)
            results[name] = (r.returncode, "CONNECTED" in r.stdout)
        assert results == {"wrong": (1, False), "right": (0, True)}, results
    finally:
        ray.shutdown()


def test_an_unreachable_server_s_jobs_go_to_the_others(server, assets, tmp_path, local_ray, caplog):
    """A worker whose server is gone (nothing listens on its port) fails its jobs after the client's retries: they are
    requeued on the live worker, none reported failed, none done twice; with no live worker left run_jobs raises."""
    from pair_builder.actors import Job, run_jobs
    from pair_builder.sources import file_instructions
    from shared.client import ServerUnavailable

    dead = f"http://127.0.0.1:{free_port()}"
    _, _, workers = _workers_and_settings(server, assets, tmp_path, [dead, server.base_url])
    jobs = [Job("build", (ins.to_json(), "short"), ins.id)
            for ins in file_instructions(assets / "instructions.jsonl")[:6]]
    results = []
    failures = run_jobs(workers, jobs, in_flight=2, on_result=lambda job, res: results.append(res))
    assert failures == 0 and all(r["error"] is None for r in results)
    assert sorted(r["instruction_id"] for r in results) == sorted(j.args[0]["id"] for j in jobs)
    assert {r["server"] for r in results} == {server.base_url}
    assert "dropping worker 0" in caplog.text and dead in caplog.text
    with pytest.raises(ServerUnavailable, match=rf"no server is left \(x\); the last lost: the server at {dead} "
                                                r"cannot be reached \(APIConnectionError"):
        run_jobs(workers[:1], jobs, in_flight=2, on_result=lambda job, res: results.append(res), servers="x")
