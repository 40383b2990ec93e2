"""Faults injected with real processes: a generation server (bench/sim_server.py) that stalls, answers 5xx or
answers garbage, or dies and comes back, against the real eval and pair_builder CLIs. Each ends in bounded time
with one clear line and its exit code, keeps what it finished, and a rerun against a healthy server goes on
without duplicates."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gen_server.process import free_port
from shared.client import wait_for_health

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
N_PROMPTS = 6


class Sim:
    """The simulated server as a subprocess; stopped in teardown whatever happens."""

    def __init__(self, port: int, *args: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "sim_server.py"), "--port", str(port),
                                      "--tokens-per-s", "1000", "--latency-ms", "1", *args])
        wait_for_health(self.url, timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def sim():
    started: list[Sim] = []

    def start(*args: str, port: int | None = None) -> Sim:
        s = Sim(port or free_port(), *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def _eval(url: str, out: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "eval", "--server", url, "--suite", "own", "--limit", str(N_PROMPTS),
                        "--out", str(out), "--concurrency", "1", "--prompts-per-request", "1", "--max-tokens", "8",
                        "client.stall_timeout_s=3", "client.timeout_s=30", *overrides],
                       capture_output=True, text=True, timeout=300)
    return r, time.monotonic() - t0


def _one_clear_line(err: str, *phrases: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    for p in phrases:
        assert p in line, line


@pytest.mark.parametrize("fault,overrides,phrases", [
    ("stall", (), ("no response from the server at", "for 3 s", "client.stall_timeout_s")),
    ("error", ("client.max_retries=1",), ("failed after 1 retries (InternalServerError",)),
    ("garbage", ("client.max_retries=0",), ("failed after 0 retries",)),
])
def test_eval_against_a_faulty_server_fails_in_bounded_time(sim, tmp_path, fault, overrides, phrases):
    s = sim("--fault", fault, "--fault-after", "2")
    r, took = _eval(s.url, tmp_path / "ev", *overrides)
    assert r.returncode == 2, r.stderr[-3000:]
    assert took < 60
    _one_clear_line(r.stderr, *phrases, "responses so far are kept")
    kept = [json.loads(x) for x in (tmp_path / "ev" / "responses.jsonl").read_text().splitlines()]
    assert len(kept) == 2  # what was answered before the fault


def test_eval_server_dies_then_comes_back_rerun_is_exact(sim, tmp_path):
    port = free_port()
    s = sim("--fault", "stall", "--fault-after", "3", port=port)
    r, _ = _eval(s.url, tmp_path / "ev")
    assert r.returncode == 2
    s.stop()  # gone; then back, healthy, on the same port
    r, _ = _eval(s.url, tmp_path / "ev")
    assert r.returncode == 2 and "no healthy generation server" in r.stderr and "Traceback" not in r.stderr
    sim(port=port)
    r, _ = _eval(s.url, tmp_path / "ev")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "ev" / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == N_PROMPTS and len({x["request_key"] for x in rows}) == N_PROMPTS  # no duplicates
    assert json.loads((tmp_path / "ev" / "scores.json").read_text())["n_prompts"] == N_PROMPTS


def _pair_builder(url: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    ins = tmp_path / "ins.jsonl"
    ins.write_text("".join(json.dumps({"id": f"i{i}", "instruction": f"Describe topic number {i} for a child."})
                           + "\n" for i in range(8)))
    return subprocess.run([sys.executable, "-m", "pair_builder", f"run.root={tmp_path / 'runs'}", "run.name=f",
                           f"pairs.servers=[{url}]", "pairs.sources=[file]", f"pairs.input_file={ins}",
                           "pairs.no_constraint_rule=prefer_rewrite", "pairs.k=2", "pairs.max_tokens=16",
                           "pairs.critique_max_tokens=16", "pairs.eos_token=EOS", "pairs.progress=false",
                           "pairs.in_flight_per_server=2", "pairs.dedupe_threshold=0.95", "client.timeout_s=30",
                           *overrides], capture_output=True, text=True, timeout=600)


def test_pair_builder_against_a_stalled_server_exits_3_in_bounded_time(sim, tmp_path):
    s = sim("--fault", "stall", "--fault-after", "1")  # the log-prob probe is answered, then nothing
    t0 = time.monotonic()
    r = _pair_builder(s.url, tmp_path, "client.stall_timeout_s=5")
    assert r.returncode == 3, r.stderr[-3000:]
    assert time.monotonic() - t0 < 120
    assert "no item finished for 5 s" in r.stderr and "Traceback" not in r.stderr
    r = _pair_builder(sim().url, tmp_path)  # a healthy server: the resubmission finishes every item
    assert r.returncode == 0, r.stderr[-3000:]
    done = [json.loads(x) for x in (tmp_path / "runs" / "f" / "round-0" / "pairs" / ".meta" / "done.jsonl")
            .read_text().splitlines()]
    assert len(done) == len({d["id"] for d in done}) == 8


def test_pair_builder_against_a_server_that_stalls_from_the_start_exits_3(sim, tmp_path):
    s = sim("--fault", "error")  # health answers, every completion is a 500
    r = _pair_builder(s.url, tmp_path, "client.max_retries=0")
    assert r.returncode == 3, r.stderr[-3000:]
    assert "answers /health but not a completion request" in r.stderr and "Traceback" not in r.stderr


def test_a_short_outage_is_ridden_out_by_the_retries(sim, tmp_path):
    """The server dies mid-eval and is back on the same port within the client's retry window: the eval finishes
    by itself, every prompt answered once."""
    import threading

    port = free_port()
    s = sim("--tokens-per-s", "8", port=port)  # ~1 s an answer: the eval is mid-way when the server dies
    restarted: list[Sim] = []

    def outage() -> None:
        time.sleep(4.0)  # the eval's start-up (~2.5 s) and an answer or two
        s.stop()
        time.sleep(2.0)
        restarted.append(sim(port=port))

    t = threading.Thread(target=outage)
    t.start()
    r, _ = _eval(s.url, tmp_path / "ev", "client.max_retries=6", "client.stall_timeout_s=60")
    t.join()
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "ev" / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == N_PROMPTS and len({x["request_key"] for x in rows}) == N_PROMPTS
    served_after = json.loads(__import__("urllib.request").request.urlopen(restarted[0].url + "/stats").read())
    assert served_after["requests"] >= 1  # some answers did come from the restarted server


def test_a_short_outage_mid_pair_building_is_ridden_out(sim, tmp_path):
    """The server dies while pair_builder's items are in flight and is back within the retry window: the job
    finishes by itself (exit 0), every item done once."""
    import threading

    port = free_port()
    s = sim("--tokens-per-s", "8", port=port)
    restarted: list[Sim] = []
    marker = tmp_path / "runs" / "f" / "round-0" / "pairs" / ".meta" / "manifest.json"

    def outage() -> None:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:  # the job has connected and started writing
            time.sleep(0.1)
        time.sleep(3.0)
        s.stop()
        time.sleep(2.0)
        restarted.append(sim(port=port))

    t = threading.Thread(target=outage)
    t.start()
    r = _pair_builder(s.url, tmp_path, "client.max_retries=6", "client.stall_timeout_s=120")
    t.join()
    assert r.returncode == 0, r.stderr[-3000:]
    done = [json.loads(x) for x in (tmp_path / "runs" / "f" / "round-0" / "pairs" / ".meta" / "done.jsonl")
            .read_text().splitlines()]
    assert len(done) == len({d["id"] for d in done}) == 8 and not any(d.get("error") for d in done)
    served_after = json.loads(__import__("urllib.request").request.urlopen(restarted[0].url + "/stats").read())
    assert served_after["requests"] >= 1


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _group(pgid: int) -> list[int]:
    import os

    members = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid:
                    members.append(int(d.name))
            except (OSError, ProcessLookupError):
                pass
    return members


@pytest.mark.parametrize("victim", ["command", "driver"])
def test_sigkill_of_pair_builder_leaves_no_ray_behind(sim, tmp_path, victim):
    """`python -m pair_builder` runs its work in a supervised child with its own local Ray. SIGKILL of the command
    (the child then gets SIGTERM and shuts Ray down) or of the driver itself (the command then kills what its
    group left: Ray's agents) leaves no process of it running."""
    import os
    import signal

    s = sim("--tokens-per-s", "4")
    ins = tmp_path / "ins.jsonl"
    ins.write_text("".join(json.dumps({"id": f"i{i}", "instruction": f"Describe topic number {i} for a child."})
                           + "\n" for i in range(8)))
    proc = subprocess.Popen([sys.executable, "-m", "pair_builder", f"run.root={tmp_path / 'runs'}", "run.name=f",
                             f"pairs.servers=[{s.url}]", "pairs.sources=[file]", f"pairs.input_file={ins}",
                             "pairs.no_constraint_rule=prefer_rewrite", "pairs.k=2", "pairs.max_tokens=16",
                             "pairs.critique_max_tokens=16", "pairs.eos_token=EOS", "pairs.progress=false",
                             "pairs.dedupe_threshold=0.95"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        manifest = tmp_path / "runs" / "f" / "round-0" / "pairs" / ".meta" / "manifest.json"
        deadline = time.monotonic() + 120
        while not manifest.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert manifest.exists(), "pair_builder did not start its work"
        time.sleep(3)  # Ray's agents are up
        [driver] = _children(proc.pid)
        group = _group(driver)
        assert len(group) > 2, group  # the driver, Ray's GCS, raylet, agents...
        os.kill(proc.pid if victim == "command" else driver, signal.SIGKILL)
        if victim == "driver":
            proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while (left := _group(driver)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"left running after SIGKILL of the {victim}: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_pair_builder_against_a_server_answering_garbage_fails_its_items_cleanly(sim, tmp_path):
    s = sim("--fault", "garbage", "--fault-after", "1")  # the probe is answered, then every body is not JSON
    r = _pair_builder(s.url, tmp_path, "client.max_retries=0")
    assert r.returncode == 4, r.stderr[-3000:]  # items failed: not done, a resubmission retries them
    assert "resubmit the same command to retry only those" in r.stderr and "Traceback" not in r.stderr
    done = tmp_path / "runs" / "f" / "round-0" / "pairs" / ".meta" / "done.jsonl"
    assert not done.exists() or not done.read_text().strip()  # nothing marked done that was not
