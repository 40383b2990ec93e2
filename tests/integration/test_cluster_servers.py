"""server.placement=ray on a REAL two-node Ray cluster on this machine: a `ray start --head` and a second
`ray start --address HEAD`, each with one `gen_server` resource, so the two embedded replicas (tiny random model)
must land one per node. The serve phase alone (start, eval over both, stop), then a pipeline round whose pairs go
through `ray job submit` to the same cluster; after each, no server process is left. Both Ray nodes and every
server are stopped by process id in teardown, whatever the test did."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from gen_server.process import free_port
from tests.integration.test_pipeline import _pipeline, _servers, tiny_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _ray_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """One `ray start --block` in a process group of its own (stopped by its id: `ray stop` would stop every Ray
    of this user), with every port it opens chosen free."""
    ports = ["--node-manager-port", "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    cmd = [RAY, "start", "--block", *args, "--num-cpus", "1", "--resources", '{"gen_server": 1}',
           "--object-store-memory", str(100 * 2**20), "--disable-usage-stats",
           "--min-worker-port", "0", "--max-worker-port", "0", *(x for p in ports for x in (p, str(free_port())))]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _kill_servers_of(model_dirs: list[Path]) -> None:
    """SIGKILL (by pid) any gen_server this test's actors started and left behind."""
    for d in model_dirs:
        for pid in _servers(d):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def two_nodes(tmp_path, tiny_model_dir):
    """(GCS address, dashboard URL, env) of a head and a worker node, each with one gen_server resource."""
    port, dash = free_port(), free_port()
    temp = Path("/tmp") / f"gsray{port}"  # Ray's socket paths must stay short
    # loopback-only test cluster; the nodes' workers import this checkout (not the editable install's) and find
    # `python` (a job's entrypoint) in this environment
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    nodes = [_ray_node(["--head", "--port", str(port), "--dashboard-port", str(dash), "--dashboard-host",
                        "127.0.0.1", "--temp-dir", str(temp), "--ray-client-server-port", str(free_port())],
                       env, tmp_path / "head.log")]
    try:
        url = f"http://127.0.0.1:{dash}"
        _wait(lambda: urllib.request.urlopen(url + "/api/version", timeout=2), nodes[0], tmp_path / "head.log")
        # a temp dir of its own: two nodes sharing one would each clean up the other's runtime envs (a job's
        # working dir vanished under pair_builder)
        nodes.append(_ray_node(["--address", f"127.0.0.1:{port}", "--temp-dir", f"{temp}w"], env,
                               tmp_path / "worker.log"))
        _wait(lambda: _gen_server_units(url) == 2 or 1 / 0, nodes[1], tmp_path / "worker.log")
        yield f"127.0.0.1:{port}", url, env
    finally:
        for n in reversed(nodes):
            _stop_group(n)
        _kill_servers_of([tiny_model_dir, tmp_path])


def _gen_server_units(url: str) -> float:
    """The gen_server units of the cluster's live nodes."""
    with urllib.request.urlopen(url + "/api/v0/nodes", timeout=5) as r:
        nodes = json.load(r)["data"]["result"]["result"]
    return sum(n["resources_total"].get("gen_server", 0) for n in nodes if n["state"] == "ALIVE")


def _wait(probe, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except (OSError, KeyError, ValueError, ZeroDivisionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"Ray node did not come up: {log.read_text()[-800:]}")
            time.sleep(0.5)


def test_serve_phase_places_one_replica_per_node(two_nodes, tmp_path, tiny_model_dir, monkeypatch):
    """start_on_ray: two replicas on two nodes (one gen_server unit each), bound to the node IP behind the key;
    the eval spreads over both; stop_on_ray leaves no server process."""
    from eval.run import EvalSettings, run_eval
    from gen_server.cluster import start_on_ray, stop_on_ray
    from shared.config import ServerConfig

    gcs, _, env = two_nodes
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    before = _servers(tiny_model_dir)
    server = ServerConfig(backend="embedded", placement="ray", replicas="auto", ray_address=gcs,
                          max_model_len=2048, health_timeout_s=180)
    servers = start_on_ray(server, tiny_model_dir, lambda i: tmp_path / f"replica-{i}.log")
    try:
        assert len(servers) == 2  # auto: the cluster's two gen_server units
        assert len({s.node_id for s in servers}) == 2
        assert len({s.base_url for s in servers}) == 2 and len({s.api_key for s in servers}) == 1
        assert not any("127.0.0.1" in s.base_url for s in servers)  # reachable from other nodes
        assert len(_servers(tiny_model_dir) - before) == 2
        scores = run_eval(base_urls=[s.base_url for s in servers], model=None, api_key=servers[0].api_key,
                          out_dir=tmp_path / "eval", suite="own", limit=8, settings=EvalSettings(max_tokens=12),
                          concurrency=2, prompts_per_request=1)
        assert scores["n_prompts"] == 8
        rows = [json.loads(x) for x in (tmp_path / "eval" / "responses.jsonl").read_text().splitlines()]
        assert {r["server"] for r in rows} == {s.base_url for s in servers}
    finally:
        stop_on_ray(servers)
    assert not _servers(tiny_model_dir) - before  # stop returns once every server is gone


def test_pipeline_round_on_the_cluster(two_nodes, tiny_config, tiny_model_dir, monkeypatch):
    """A whole pipeline round with server.placement=ray and pipeline.pairs_runner=ray_job: round 0 served on both
    nodes, its pairs built by a job on the same cluster over both replicas, then train, merge and round 1 served
    (on the merged model) on both nodes again; no server left after any phase."""
    gcs, _, env = two_nodes
    for k in ("RAY_AUTH_MODE", "PYTHONPATH", "PATH"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the job API is found from the cluster the servers run on
    p, run = tiny_config
    cfg = yaml.safe_load(p.read_text())
    cfg["server"].update(placement="ray", replicas=2, ray_address=gcs, health_timeout_s=180)
    cfg["pipeline"]["pairs_runner"] = "ray_job"
    p.write_text(yaml.safe_dump(cfg))
    before = _servers(tiny_model_dir)
    r = _pipeline("run", "--config", str(p), timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    placed = [line for line in r.stderr.splitlines() if "gen_server replica at" in line]
    assert len(placed) == 4, r.stderr[-4000:]  # two replicas in round 0, two in round 1 (on the merged model)
    for rnd in (placed[:2], placed[2:]):
        assert len({line.split(" on node ")[1].split()[0] for line in rnd}) == 2, rnd
    urls = {line.split("gen_server replica at ")[1].split()[0] for line in placed[:2]}
    done = [json.loads(x) for x in (run / "round-0" / "pairs" / ".meta" / "done.jsonl").read_text().splitlines()]
    assert done and {d["server"] for d in done} == urls  # pairs built on both nodes
    state = json.loads((run / "state.json").read_text())
    assert state["stopped"]["round"] == 1 and (run / "round-1" / "eval" / "scores.json").exists()
    assert not _servers(tiny_model_dir) - before and not _servers(run / "round-0" / "merged")
