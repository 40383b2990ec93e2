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
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **(self.env or {}), "GEN_SERVER_API_KEY": self.api_key}  # key not on the command line
        log.info("starting gen_server (%s) on %s, log: %s", self.backend, self.base_url, self.log_path)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, preexec_fn=die_with_parent)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

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
