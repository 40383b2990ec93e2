"""Run ``python -m gen_server`` as a child process: start, wait for /health, stop - even on errors.

Used by the pipeline (one server per phase, so GPU memory is free before training), the demo and the
integration tests. Light on purpose: no torch import here.

    with ServerProcess("smollm2-135m", backend="embedded", log_path="runs/x/server.log") as srv:
        client = make_client(srv.base_url, srv.api_key)
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from shared.client import ServerUnavailable, wait_for_health
from shared.procs import die_with_parent, stop_group

log = logging.getLogger(__name__)

STOP_GRACE_S = 45.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log written)"


class ServerProcess:
    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        backend: str = "embedded",
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        served_model_name: str | None = None,
        extra_args: list[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        health_timeout: float = 300.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model = str(model)
        self.backend = backend
        self.host = host
        self.port = port or free_port(host)
        self.api_key = api_key or secrets.token_hex(16)  # hex: never starts with "-", which a CLI reads as a flag
        self.served_model_name = served_model_name
        self.extra_args = list(extra_args or [])
        self.log_path = Path(log_path) if log_path else Path(os.environ.get("TMPDIR", "/tmp")) / f"gen_server-{self.port}.log"
        self.health_timeout = health_timeout
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_config(cls, server: Any, model: str | os.PathLike[str], **kwargs: Any) -> ServerProcess:
        """A server for ``model`` with the options of a ``ServerConfig`` (shared/config.py).

        Only the options of the backend that will run are passed (gen_server rejects the other's);
        ``auto`` is resolved here the way ``python -m gen_server`` would.
        """
        from gen_server import backends

        backend = server.backend
        if backend == "auto":
            backend, why = backends.choose()
            log.info("server backend: %s (%s)", backend, why)
        args = ["--dtype", server.dtype, "--seed", str(server.seed)]
        if server.max_model_len:
            args += ["--max-model-len", str(server.max_model_len)]
        args += backends.get(backend).config_args(server)  # only the flags the backend that will run understands
        kwargs.setdefault("health_timeout", server.health_timeout_s)
        return cls(model, backend=backend, host=server.host, api_key=server.api_key,
                   served_model_name=server.served_model_name, extra_args=args, **kwargs)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "gen_server", "--model", self.model, "--backend", self.backend,
               "--host", self.host, "--port", str(self.port)]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        return cmd + self.extra_args

    def start(self) -> ServerProcess:
        self.launch()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> None:
        """Start the process without waiting for it. Call it from the thread that lives as long as the server:
        the child dies with the thread that started it (``die_with_parent``: PR_SET_PDEATHSIG)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(self.env or {}), "GEN_SERVER_API_KEY": self.api_key}  # key not on the command line
        log.info("starting gen_server (%s) on %s, log: %s", self.backend, self.base_url, self.log_path)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, preexec_fn=die_with_parent)

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.health_timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerUnavailable(
                    f"gen_server exited with code {self.proc.returncode} before becoming healthy. "
                    f"Last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                wait_for_health(self.base_url, timeout=min(2.0, max(0.1, deadline - time.monotonic())), interval=0.25)
                return
            except ServerUnavailable:
                if time.monotonic() >= deadline:
                    raise ServerUnavailable(
                        f"gen_server did not become healthy within {self.health_timeout:.0f}s at {self.base_url}. "
                        f"Last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                    ) from None

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds (longer than the vLLM
        backend's own 30 s grace for vLLM, which runs in a session of its own and dies with gen_server)."""
        if self.proc is None:
            return
        stop_group(self.proc, grace, "gen_server")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _cuda_visible() -> list[str] | None:
    """The device ids ``CUDA_VISIBLE_DEVICES`` lists, or None when it is unset."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if vis is None else [d.strip() for d in vis.split(",") if d.strip() and d.strip() != "-1"]


def visible_gpus() -> int:
    """GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else what ``nvidia-smi -L`` lists (0 when
    there is none). Read without importing torch: the serving side never needs it."""
    if (ids := _cuda_visible()) is not None:
        return len(ids)
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def gpus_per_replica(server: Any) -> int:
    """GPUs one replica holds: none for the embedded CPU server, else vLLM's tensor x data parallel group."""
    return 0 if server.backend == "embedded" else server.tensor_parallel_size * server.data_parallel_size


def replica_devices(replicas: int | str, per_replica: int, gpus: int) -> list[str | None]:
    """The ``CUDA_VISIBLE_DEVICES`` of each replica: consecutive groups of ``per_replica`` GPUs
    (:func:`gpus_per_replica`: "0", "1", or "0,1", "2,3"); None for each replica when there is no GPU (the
    embedded CPU server). ``auto``: as many replicas as the GPUs hold (at least one). Raises ValueError when the
    GPUs are too few."""
    if gpus == 0 or per_replica == 0:
        return [None] * (1 if replicas == "auto" else int(replicas))
    n = max(1, gpus // per_replica) if replicas == "auto" else int(replicas)
    if n * per_replica > gpus:
        raise ValueError(f"server.replicas={replicas} x {per_replica} GPU(s) a replica (tensor x data parallel "
                         f"size) needs {n * per_replica} GPUs; {gpus} visible. Lower server.replicas (or use 'auto')")
    ids = _cuda_visible() or [str(i) for i in range(gpus)]
    return [",".join(ids[i * per_replica:(i + 1) * per_replica]) for i in range(n)]


def start_replicas(server: Any, model: str | os.PathLike[str], log_path: Any, **kwargs: Any) -> list[ServerProcess]:
    """``server.replicas`` servers of ``model`` (a ``ServerConfig``), started together, each on its own port and
    GPU(s) and sharing one API key; ``log_path(i)`` names replica i's log. All are stopped if one fails."""
    from concurrent.futures import ThreadPoolExecutor

    devices = replica_devices(server.replicas, gpus_per_replica(server),
                              visible_gpus() if server.backend != "embedded" else 0)
    key = server.api_key or secrets.token_hex(16)
    procs = []
    for i, dev in enumerate(devices):
        env = {"CUDA_VISIBLE_DEVICES": dev} if dev is not None and len(devices) > 1 else None
        procs.append(ServerProcess.from_config(server.model_copy(update={"api_key": key}), model,
                                               log_path=log_path(i), env=env, **kwargs))
    try:
        for p in procs:  # launched from this thread (they die with the thread that starts them), then
            p.launch()   # waited for together: N replicas load in the time of one
        with ThreadPoolExecutor(len(procs)) as pool:
            errors = [f.exception() for f in [pool.submit(p._wait_healthy) for p in procs]]
        if failed := [e for e in errors if e is not None]:
            raise failed[0]
    except BaseException:
        stop_all(procs)
        raise
    return procs


def stop_all(procs: list[ServerProcess]) -> None:
    """Stop every server at once (each waits out its own grace), so N replicas take one grace, not N."""
    from concurrent.futures import ThreadPoolExecutor

    if procs:
        with ThreadPoolExecutor(len(procs)) as pool:
            list(pool.map(lambda p: p.stop(), procs))
