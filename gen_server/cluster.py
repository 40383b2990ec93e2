"""A round's generation servers on a Ray cluster (``server.placement: ray``): one actor per replica.

Each :class:`ServerActor` runs the same ``python -m gen_server`` child as a local replica (``ServerProcess``),
on the node Ray placed it: bound to that node's IP (the driver and pair_builder reach it from other nodes),
behind the API key every replica shares. The actor is not threaded, so its ``__init__`` and methods run on the
worker's main thread, which lives exactly as long as the actor: the server, launched there, dies with it
(PR_SET_PDEATHSIG). ``ray.kill``, a lost node, or the pipeline's own death (the actors share their owner's
fate) thus leave no server behind; :func:`stop_on_ray` still stops each server first and waits for it, so GPU
memory is free before training.

The model dir must be readable at the same path on every node that may host a replica (shared storage, or the
same copy on each), and so must this package (installed on every node: cluster.yaml's setup_commands).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

import ray

from gen_server.process import STOP_GRACE_S, ServerProcess, gpus_per_replica, stop_all

log = logging.getLogger(__name__)

PLACE_GRACE_S = 30.0  # beyond the server's health timeout: the actor's own start (a worker process, imports)


class ServerActor:
    """One gen_server on the node this actor runs on (used as a Ray actor: :func:`start_on_ray`)."""

    def __init__(self, server: Any, model: str, log_path: str) -> None:
        host = ray.util.get_node_ip_address()  # not loopback: the driver may be on another node
        self.proc = ServerProcess.from_config(server.model_copy(update={"host": host}), model, log_path=log_path)
        self.proc.launch()  # from this (main) thread: the server lives as long as the actor

    def wait_healthy(self) -> dict[str, Any]:
        """Wait for /health; where the server runs (raises ServerUnavailable with its log's tail if it died)."""
        self.proc._wait_healthy()
        assert self.proc.proc is not None
        return {"url": self.proc.base_url, "node_id": ray.get_runtime_context().get_node_id(),
                "pid": self.proc.proc.pid, "log": str(self.proc.log_path)}

    def stop(self) -> None:
        self.proc.stop()


class RayServer:
    """The driver's handle on one replica: what the pipeline uses of a ``ServerProcess`` (base_url, api_key,
    stop), plus where it runs."""

    def __init__(self, actor: Any, api_key: str, info: dict[str, Any]) -> None:
        self.actor, self.api_key = actor, api_key
        self.base_url: str = info["url"]
        self.node_id: str = info["node_id"]
        self.pid: int = info["pid"]
        self.log_path = Path(info["log"])

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop the server and wait for it (the actor SIGTERMs its group, SIGKILLs it after ``grace``), then
        kill the actor. An actor that cannot be reached (its node is gone) is killed all the same: its server
        dies with it."""
        _stop_actor(self.actor, grace)


def _stop_actor(actor: Any, grace: float = STOP_GRACE_S) -> None:
    try:
        ray.get(actor.stop.remote(), timeout=grace + PLACE_GRACE_S)
    except (ray.exceptions.RayError, TimeoutError) as e:  # GetTimeoutError is a TimeoutError
        log.warning("a gen_server actor did not stop cleanly (%s); killing it", type(e).__name__)
    finally:
        ray.kill(actor, no_restart=True)


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (None: RAY_ADDRESS, else the one started on this node) unless joined."""
    if not ray.is_initialized():
        ray.init(address=address or "auto", logging_level=logging.WARNING, log_to_driver=False)


def dashboard_url() -> str | None:
    """The joined cluster's job API (``ray job submit --address``), or None when it runs no dashboard."""
    url = ray._private.worker.global_worker.node.address_info.get("webui_url")
    return None if not url else url if url.startswith("http") else f"http://{url}"


def replica_count(server: Any) -> int:
    """``server.replicas``; ``auto``: one per unit of ``server.ray_resource`` the cluster has (per
    ``gpus_per_replica`` GPUs when it is null), at least one."""
    if server.replicas != "auto":
        return int(server.replicas)
    have = ray.cluster_resources()
    if server.ray_resource:
        return max(1, int(have.get(server.ray_resource, 0)))
    return max(1, int(have.get("GPU", 0)) // max(1, gpus_per_replica(server)))


def actor_options(server: Any) -> dict[str, Any]:
    """Where a replica may go: its GPUs and one unit of ``server.ray_resource``; spread over the nodes."""
    return {"num_cpus": 0, "num_gpus": gpus_per_replica(server), "max_restarts": 0,
            "resources": {server.ray_resource: 1} if server.ray_resource else {},
            "scheduling_strategy": "SPREAD"}


def start_on_ray(server: Any, model: str | os.PathLike[str], log_path: Any) -> list[RayServer]:
    """``server.replicas`` servers of ``model`` on the cluster at ``server.ray_address``, one actor each, started
    together and sharing one API key; ``log_path(i)`` names replica i's log (on the node that runs it). All are
    stopped if one fails or cannot be placed within ``server.health_timeout_s``."""
    connect(server.ray_address)
    key = server.api_key or secrets.token_hex(16)
    cfg = server.model_copy(update={"api_key": key})
    cls = ray.remote(ServerActor).options(**actor_options(server))
    n = replica_count(server)
    actors = [cls.remote(cfg, str(Path(model).resolve()), str(Path(log_path(i)).resolve())) for i in range(n)]
    try:
        refs = [a.wait_healthy.remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=n, timeout=server.health_timeout_s + PLACE_GRACE_S)
        if len(ready) < n:
            raise TimeoutError(
                f"{n - len(ready)} of {n} gen_server replicas were not up on the Ray cluster within "
                f"{server.health_timeout_s + PLACE_GRACE_S:.0f}s: each needs {actor_options(server)['resources'] or 'no'} "
                f"custom resource and {gpus_per_replica(server)} GPU(s); the cluster has {ray.cluster_resources()}")
        servers = [RayServer(a, key, info) for a, info in zip(actors, ray.get(refs))]
    except BaseException:
        _kill(actors)
        ray.shutdown()
        raise
    for s in servers:
        log.info("gen_server replica at %s on node %s (log there: %s)", s.base_url, s.node_id[:12], s.log_path)
    return servers


def _kill(actors: list[Any]) -> None:
    """Kill actors whose servers may still be loading (their main thread is busy waiting for /health, so a
    ``stop`` call would queue behind it): each server gets SIGTERM from the kernel as its actor dies."""
    for a in actors:
        ray.kill(a, no_restart=True)


def stop_on_ray(servers: list[RayServer]) -> None:
    """Stop every replica at once (one grace for all; each returns once its server's process group is gone),
    kill the actors and leave the cluster."""
    try:
        stop_all(servers)  # type: ignore[arg-type]  # duck-typed: RayServer.stop
    finally:
        ray.shutdown()
