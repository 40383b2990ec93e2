"""The ``--backend vllm`` side of gen_server: build a vLLM OpenAI-server command and supervise it.

``python -m gen_server --backend vllm --model DIR`` ends up here. The server runs as a child process
(``python -m vllm.entrypoints.openai.api_server``, which also works when vLLM was installed with
``pip --target``); we tee its output to a log file and to our stderr, wait for ``/health``, forward
SIGTERM/SIGINT, and on failure print the tail of its log with the reason.

    from gen_server.vllm_backend import VllmOptions, build_vllm_command, run_vllm
    build_vllm_command(VllmOptions(model="/models/qwen2.5-32b", quantization="fp8"))
    raise SystemExit(run_vllm(VllmOptions(model="/models/qwen2.5-32b")))   # blocks while serving
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from shared.procs import die_with_parent

log = logging.getLogger(__name__)

# Measured on the GPU machines: flashinfer is not in the tested wheel set, and the engine fails to start unless its
# sampler is off; usage stats would try to reach the internet. User-set values win.
VLLM_ENV_DEFAULTS: dict[str, str] = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_NO_USAGE_STATS": "1"}

LOG_TAIL_LINES = 40
INSTALL_HINT = (
    "vLLM is not installed in this Python environment. On a GPU machine install the serve extra "
    "(pip install -e .[serve]), or use --backend embedded to serve on CPU."
)


@dataclass
class VllmOptions:
    """What we let users set for a vLLM server; anything else goes through ``extra_args`` verbatim."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    quantization: str = "none"  # "fp8": on-the-fly fp8 weights (H100/A100 8-bit serving); "none": as stored
    max_model_len: int | None = None  # None: the model's own context length
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_prefix_caching: bool | None = None  # None: vLLM's default
    extra_args: list[str] = field(default_factory=list)


def build_vllm_command(opts: VllmOptions) -> list[str]:
    """The argv that starts vLLM's OpenAI-compatible server for ``opts`` (flags as in vLLM 0.25.1)."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(opts.model),
        "--host", opts.host,
        "--port", str(opts.port),
        "--dtype", opts.dtype,
        "--gpu-memory-utilization", str(opts.gpu_memory_utilization),
        "--seed", str(opts.seed),
        "--tensor-parallel-size", str(opts.tensor_parallel_size),
        "--data-parallel-size", str(opts.data_parallel_size),
    ]  # fmt: skip
    if opts.api_key:
        cmd += ["--api-key", opts.api_key]
    if opts.served_model_name:
        cmd += ["--served-model-name", opts.served_model_name]
    if opts.quantization and opts.quantization != "none":
        cmd += ["--quantization", opts.quantization]
    if opts.max_model_len is not None:
        cmd += ["--max-model-len", str(opts.max_model_len)]
    if opts.enable_prefix_caching is not None:
        cmd.append("--enable-prefix-caching" if opts.enable_prefix_caching else "--no-enable-prefix-caching")
    return cmd + list(opts.extra_args)


def vllm_env(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` plus :data:`VLLM_ENV_DEFAULTS` for the variables it does not set."""
    return {**VLLM_ENV_DEFAULTS, **base}


def health_url(host: str, port: int) -> str:
    """URL to poll: a wildcard bind address is reached through loopback."""
    client_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in client_host:  # IPv6 literal
        client_host = f"[{client_host}]"
    return f"http://{client_host}:{port}/health"


def _redacted(cmd: list[str]) -> str:
    out = list(cmd)
    for i, arg in enumerate(out[:-1]):
        if arg == "--api-key":
            out[i + 1] = "***"
    return " ".join(out)


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from an earlier run is fine
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tee(src: IO[bytes], log_file: IO[bytes], tail: collections.deque[str]) -> None:
    """Copy the child's output to the log file and our stderr, keeping the last lines for error reports."""
    for line in iter(src.readline, b""):
        log_file.write(line)
        log_file.flush()
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()
        tail.append(line.decode("utf-8", errors="replace").rstrip("\n"))


class _SignalForwarder:
    """While active, SIGTERM/SIGINT sent to us are passed on to the child and wake the supervisor."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.received: int | None = None
        self.wake = threading.Event()
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        self.wake.set()

    def __enter__(self) -> _SignalForwarder:
        if threading.current_thread() is threading.main_thread():  # signal handlers: main thread only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _stop(proc: subprocess.Popen[bytes], grace: float) -> bool:
    """Wait up to ``grace`` s for the child to exit (it has been signalled); SIGKILL its group after.

    Returns True if it exited by itself. The group kill also reaches vLLM's engine-core workers.
    """
    try:
        proc.wait(timeout=grace)
        return True
    except subprocess.TimeoutExpired:
        log.warning("vLLM did not exit within %.0f s; killing its process group", grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False


def run_vllm(
    opts: VllmOptions,
    *,
    health_timeout: float = 900.0,
    log_path: str | os.PathLike[str] | None = None,
    stop_grace: float = 30.0,
) -> int:
    """Start vLLM for ``opts``, wait until ``/health`` answers, and block while it serves.

    Returns 0 after a clean stop (SIGTERM/SIGINT to this process are forwarded to vLLM), non-zero
    if vLLM is not installed, exits with an error, or is not healthy within ``health_timeout`` s.
    """
    if importlib.util.find_spec("vllm") is None:
        log.error("%s", INSTALL_HINT)
        return 1

    cmd = build_vllm_command(opts)
    log_path = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"gen_server-vllm-{opts.port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = health_url(opts.host, opts.port)
    log.info("starting vLLM: %s", _redacted(cmd))
    log.info("vLLM log: %s", log_path)

    if _port_in_use(opts.host, opts.port):
        # Otherwise another server's /health could pass for vLLM's.
        log.error(
            "Port %d on %s is already in use; stop what listens there or pick another --port", opts.port, opts.host
        )
        return 1

    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    timed_out = False
    exited_cleanly = True
    healthy = False
    with open(log_path, "ab") as log_file:
        # Appended, not truncated: earlier runs' logs on this port stay readable after a restart.
        log_file.write(f"=== gen_server {time.strftime('%Y-%m-%d %H:%M:%S')}: {_redacted(cmd)}\n".encode())
        log_file.flush()
        # Own session: a Ctrl-C in the terminal reaches vLLM once (through us), not twice, and
        # a SIGKILL of its process group takes its engine workers with it.
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=vllm_env(os.environ), start_new_session=True,
            preexec_fn=die_with_parent,  # gen_server SIGKILLed: vLLM (in its own session) must not hold the GPU
        )
        try:
            assert proc.stdout is not None  # stdout=PIPE
            tee = threading.Thread(target=_tee, args=(proc.stdout, log_file, tail), daemon=True)
            tee.start()
            with _SignalForwarder(proc) as signals:
                started = time.monotonic()
                while proc.poll() is None:
                    if signals.received is not None:
                        log.info("received %s; stopping vLLM", signal.Signals(signals.received).name)
                        exited_cleanly = _stop(proc, stop_grace)
                        break
                    if not healthy:
                        if _is_healthy(url):
                            healthy = True
                            log.info(
                                "vLLM is ready after %.0f s: %s (OpenAI API at %s)",
                                time.monotonic() - started,
                                url,
                                url.removesuffix("/health") + "/v1",
                            )
                        elif time.monotonic() - started > health_timeout:
                            timed_out = True
                            proc.terminate()
                            _stop(proc, stop_grace)
                            break
                    signals.wake.wait(1.0)
            # The pipe can stay open in orphaned grandchildren; don't hang on it.
            tee.join(timeout=5.0)
        finally:
            if proc.poll() is None:  # we are failing ourselves: never leave a GPU server behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    rc = proc.returncode
    if signals.received is not None:
        return 0 if exited_cleanly else 1
    if timed_out:
        _report_failure(f"vLLM did not answer {url} within {health_timeout:.0f} s; stopped it", tail, log_path)
        return 1
    if rc != 0:
        when = "while serving" if healthy else "before it became healthy"
        _report_failure(f"vLLM exited with code {rc} {when}", tail, log_path)
        return rc if rc > 0 else 1
    log.info("vLLM exited")
    return 0


def _report_failure(reason: str, tail: collections.deque[str], log_path: Path) -> None:
    lines = "\n".join(tail) or "(vLLM printed nothing)"
    log.error("%s. Last %d lines of its log (full log: %s):\n%s", reason, len(tail), log_path, lines)
