"""``python -m gen_server`` as users run it, as a real subprocess, with no GPU.

The vLLM launcher's supervision is exercised against fake ``vllm`` packages put on PYTHONPATH: one that
fails at start-up, one that never becomes healthy, one that serves ``/health`` and records its argv and
the signal it receives.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

FAILING_SERVER = """
import sys
print("INFO loading model weights", flush=True)
for i in range(60):
    print(f"INFO fake progress line {i}", flush=True)
print("ERROR torch.OutOfMemoryError: CUDA out of memory (fake)", flush=True)
sys.exit(1)
"""

SILENT_SERVER = """
import time
print("INFO compiling forever", flush=True)
time.sleep(600)
"""

SERVING_SERVER = """
import json, os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
host, port = argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])
record = os.environ["FAKE_VLLM_RECORD"]


def write(received):
    env = {k: os.environ.get(k) for k in ("VLLM_NO_USAGE_STATS", "VLLM_USE_FLASHINFER_SAMPLER")}
    with open(record + ".tmp", "w") as f:
        json.dump({"argv": argv, "pid": os.getpid(), "signal": received, "env": env}, f)
    os.replace(record + ".tmp", record)


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer((host, port), Health)


def on_signal(signum, frame):
    write(signal.Signals(signum).name)
    threading.Thread(target=server.shutdown).start()


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
write(None)
print("INFO fake vllm serving", flush=True)
server.serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_vllm(root: Path, api_server_source: str) -> Path:
    """A package tree that `python -m vllm.entrypoints.openai.api_server` runs."""
    pkg = root / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (root / "vllm", root / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(textwrap.dedent(api_server_source))
    return root


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    # the launcher checks the files a model dir needs are there (not their contents); vLLM is fake
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.json").write_text("{}")
    return d


def cli_env(*paths: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GEN_SERVER_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(REPO)])
    return env | extra


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gen_server", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_vllm_failing_at_startup_exits_nonzero_with_log_tail(tmp_path, model_dir):
    fake = fake_vllm(tmp_path / "fake", FAILING_SERVER)
    log_file = tmp_path / "vllm.log"
    res = run_cli(
        ["--model", str(model_dir), "--backend", "vllm", "--port", str(free_port()), "--log-file", str(log_file)],
        cli_env(fake),
    )
    assert res.returncode != 0
    assert "vLLM exited with code 1 before it became healthy" in res.stderr
    summary = res.stderr.split("before it became healthy", 1)[1]
    assert "CUDA out of memory (fake)" in summary and "fake progress line 59" in summary
    assert "fake progress line 5\n" not in summary  # only the tail is repeated
    assert "CUDA out of memory (fake)" in log_file.read_text()


def test_vllm_never_healthy_is_stopped_after_the_timeout(tmp_path, model_dir):
    fake = fake_vllm(tmp_path / "fake", SILENT_SERVER)
    t0 = time.monotonic()
    res = run_cli(
        [
            "--model",
            str(model_dir),
            "--backend",
            "vllm",
            "--port",
            str(free_port()),
            "--health-timeout",
            "2",
            "--log-file",
            str(tmp_path / "vllm.log"),
        ],
        cli_env(fake),
    )
    assert res.returncode != 0
    assert "did not answer" in res.stderr and "compiling forever" in res.stderr
    assert time.monotonic() - t0 < 30


def _kill(proc: subprocess.Popen, child_pid: int | None) -> None:
    """Teardown: gen_server and its (fake) vLLM child are gone, however the test ended."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if child_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)


def test_vllm_serves_gets_mapped_args_and_sigterm_is_forwarded(tmp_path, model_dir):
    fake = fake_vllm(tmp_path / "fake", SERVING_SERVER)
    record = tmp_path / "record.json"
    port = free_port()
    args = [
        "--model",
        str(model_dir),
        "--backend",
        "vllm",
        "--port",
        str(port),
        "--quantization",
        "fp8",
        "--tensor-parallel-size",
        "2",
        "--no-enable-prefix-caching",
        "--max-model-len",
        "4096",
        "--served-model-name",
        "policy",
        "--log-file",
        str(tmp_path / "vllm.log"),
        "--",
        "--max-num-seqs",
        "8",
    ]
    env = cli_env(fake, FAKE_VLLM_RECORD=str(record), GEN_SERVER_API_KEY="k-123")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gen_server", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    child_pid = None
    try:
        deadline = time.monotonic() + 30
        while not any("vLLM is ready" in line for line in stderr):
            assert proc.poll() is None, "".join(stderr)
            assert time.monotonic() < deadline, "never became healthy:\n" + "".join(stderr)
            time.sleep(0.1)
        started = json.loads(record.read_text())
        child_pid = started["pid"]
        argv = started["argv"]
        assert argv[argv.index("--model") + 1] == str(model_dir)
        assert argv[argv.index("--port") + 1] == str(port)
        assert argv[argv.index("--quantization") + 1] == "fp8"
        assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
        assert argv[argv.index("--max-model-len") + 1] == "4096"
        assert argv[argv.index("--served-model-name") + 1] == "policy"
        assert argv[argv.index("--api-key") + 1] == "k-123"  # from $GEN_SERVER_API_KEY
        assert "--no-enable-prefix-caching" in argv
        assert argv[-2:] == ["--max-num-seqs", "8"]
        assert started["env"] == {"VLLM_NO_USAGE_STATS": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0"}
        assert "k-123" not in "".join(stderr), "the API key must not be logged"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "".join(stderr)
        assert json.loads(record.read_text())["signal"] == "SIGTERM"
        with pytest.raises(ProcessLookupError):
            os.kill(child_pid, 0)
    finally:
        _kill(proc, child_pid)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm_says_how_to_install(model_dir):
    res = run_cli(["--model", str(model_dir), "--backend", "vllm", "--port", str(free_port())], cli_env())
    assert res.returncode != 0
    assert "pip install -e .[serve]" in res.stderr and "--backend embedded" in res.stderr


def test_missing_model_dir_exits_2_with_the_fix():
    res = run_cli(["--model", "/nonexistent/model", "--backend", "vllm"], cli_env())
    assert res.returncode == 2
    assert "/nonexistent/model" in res.stderr and "model directory" in res.stderr and "smollm2-135m" in res.stderr


def test_vllm_dies_with_a_sigkilled_gen_server(tmp_path, model_dir):
    """vLLM runs in a session of its own (a Ctrl-C reaches it once), so nothing signals it as a group when
    gen_server is SIGKILLed: it must die with its parent (PR_SET_PDEATHSIG) and not hold the GPU."""
    fake = fake_vllm(tmp_path / "fake", SERVING_SERVER)
    record = tmp_path / "record.json"
    env = cli_env(fake, FAKE_VLLM_RECORD=str(record), GEN_SERVER_API_KEY="k")
    proc = subprocess.Popen([sys.executable, "-m", "gen_server", "--model", str(model_dir), "--backend", "vllm",
                             "--port", str(free_port()), "--log-file", str(tmp_path / "vllm.log")],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child_pid = None
    try:
        deadline = time.monotonic() + 30
        while not record.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the fake vLLM never started"
            time.sleep(0.1)
        child_pid = json.loads(record.read_text())["pid"]
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(child_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        with pytest.raises(ProcessLookupError):
            os.kill(child_pid, 0)
        assert json.loads(record.read_text())["signal"] == "SIGTERM"  # told to stop, not killed outright
    finally:
        _kill(proc, child_pid)
