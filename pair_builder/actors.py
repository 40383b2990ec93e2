"""Ray actors (thin wrappers of the plain functions) and the driver loop that feeds them.

One :class:`PairWorker` per generation server. Each is a threaded actor with ``max_concurrency =
pairs.in_flight_per_server``: that many items run at once, each sending its requests in turn, so a
server never has more than that many requests from us in flight. The driver hands the next item to the
least-loaded worker, so faster servers get more work. Workers hold no state worth saving: with
``max_restarts`` / ``max_task_retries`` Ray restarts a lost worker and reruns its unfinished items, and
the driver (the only writer) drops a result whose id is already done.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import ray
from ray.exceptions import RayError

from pair_builder.build import BuildSettings, build_item, example_index
from pair_builder.constitution import Constitution
from pair_builder.sample import Usage
from pair_builder.sources import Instruction, request_tasks
from shared.client import ServerUnavailable, make_client
from shared.prompting import BaseTemplate

log = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"


def init_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address``, or start a local one that lets nobody in.

    A local Ray listens on every interface (Ray 2.60's GCS, raylet and workers bind all of them; nothing
    narrows that), so what keeps others out is Ray's token authentication: every connection must present the
    token in ``~/.ray/auth_token`` (Ray writes it world-readable; made owner-only here). Ray enables it by default
    for a local cluster; this relies on that, and says so when a user's ``RAY_AUTH_MODE`` turned it off."""
    if address is None:
        # Unset is Ray's default, token; setting it here instead would leave Ray's already-loaded config behind
        mode = os.environ.get(AUTH_MODE_ENV, "token")
        if mode.lower() != "token":
            log.warning("%s=%s: the local Ray cluster pair_builder starts accepts anyone who can reach this "
                        "machine; unset it to require Ray's token", AUTH_MODE_ENV, mode)
    ray.init(address=address, include_dashboard=False if address is None else None, log_to_driver=True,
             logging_level=logging.WARNING)
    token = Path.home() / ".ray" / "auth_token"
    if address is None and token.is_file() and token.stat().st_uid == os.getuid():
        token.chmod(0o600)


class PairWorker:
    """Builds pairs against one server; every method is a plain function call with this server's client."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout: float, max_retries: int,
                 settings: BuildSettings, template: BaseTemplate, constitution: Constitution) -> None:
        self.base_url = base_url
        # The openai client retries connection errors, 429 and 5xx with exponential backoff and jitter.
        self.client = make_client(base_url, api_key, timeout=timeout, max_retries=max_retries)
        self.settings, self.template, self.constitution = settings, template, constitution
        self.examples = example_index(settings, template, constitution)

    def build(self, instruction: dict[str, Any], principle_id: str, fewshot: list[str] = ()) -> dict[str, Any]:
        """The item's result; raises :class:`ServerUnavailable` when the server could not be reached (after the
        client's retries): not the item's failure, so :func:`run_jobs` gives it to another server. ``fewshot``:
        the template's rare example words for this round (verify.ExampleIndex.with_fewshot)."""
        examples = self.examples.with_fewshot(fewshot) if self.examples is not None and fewshot else self.examples
        result = build_item(self.client, Instruction.from_json(instruction), self.constitution.get(principle_id),
                            settings=self.settings, template=self.template, examples=examples)
        if result.pop("unreachable", False):
            raise self._lost(result["error"])
        result["server"] = self.base_url
        return result

    def write_tasks(self, examples: list[str], n: int, seed: int, max_tokens: int) -> dict[str, Any]:
        usage = Usage()
        try:
            tasks = request_tasks(self.client, self.settings.model, examples, n=n, seed=seed, max_tokens=max_tokens,
                                  usage=usage)
        except openai.APIConnectionError as e:
            raise self._lost(f"{type(e).__name__}: {e}") from None
        return {"tasks": tasks, "usage": vars(usage)}

    def _lost(self, why: str) -> ServerUnavailable:
        return ServerUnavailable(f"the server at {self.base_url} cannot be reached ({why})")


def start_workers(urls: list[str], api_key: str | None, *, in_flight: int, max_restarts: int, timeout: float,
                  max_retries: int, settings: BuildSettings, template: BaseTemplate,
                  constitution: Constitution) -> list[Any]:
    """One actor per server. num_cpus=0: they wait on HTTP, the servers do the compute."""
    remote_cls = ray.remote(PairWorker)
    return [
        remote_cls.options(num_cpus=0, max_concurrency=in_flight, max_restarts=max_restarts,
                           max_task_retries=max_restarts).remote(
            url, api_key, timeout=timeout, max_retries=max_retries, settings=settings, template=template,
            constitution=constitution)
        for url in urls
    ]


@dataclass
class Job:
    method: str
    args: tuple[Any, ...]
    key: str  # names the work in errors and failed results


class Stalled(ServerUnavailable):
    """No job finished for ``stall_timeout`` seconds while jobs were in flight."""


def run_jobs(workers: list[Any], jobs: Iterable[Job], *, in_flight: int, on_result: Callable[[Job, Any], None],
             should_stop: Callable[[], bool] = lambda: False, stall_timeout: float | None = None,
             servers: str = "the servers") -> int:
    """Run jobs over workers, at most ``in_flight`` per worker, least-loaded first; returns failures.

    A job whose worker died past its restarts is reported to ``on_result`` as ``{"error": ...}``; its item
    is not done, so the next submission redoes it. A job whose server cannot be reached (the worker raised
    :class:`ServerUnavailable`) is no failure: that worker gets no more jobs, and the job goes back on the queue
    for the others; when every server is lost, :class:`ServerUnavailable` is raised. When no job finishes for
    ``stall_timeout`` seconds, :class:`Stalled` is raised. Either way finished items are kept and a resubmission
    goes on.
    """
    queue = deque(jobs)
    load = [0] * len(workers)
    alive = set(range(len(workers)))
    pending: dict[Any, tuple[int, Job]] = {}
    failures = 0
    last = time.monotonic()
    while queue or pending:
        while queue and not should_stop() and min(load[w] for w in alive) < in_flight:
            w = min(sorted(alive), key=load.__getitem__)
            job = queue.popleft()
            pending[getattr(workers[w], job.method).remote(*job.args)] = (w, job)
            load[w] += 1
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        if ready:
            last = time.monotonic()
        elif stall_timeout is not None and time.monotonic() - last > stall_timeout:
            raise Stalled(f"no item finished for {stall_timeout:g} s with {len(pending)} in flight: {servers} "
                          f"stalled or died (see the server log). Finished items are kept: resubmit to go on; raise "
                          f"client.stall_timeout_s if single items really take that long")
        for ref in ready:
            w, job = pending.pop(ref)
            load[w] -= 1
            try:
                result = ray.get(ref)
            except ServerUnavailable as e:  # Ray's error for the worker's raise is also the raised class
                queue.appendleft(job)
                _lose(alive, w, e, servers)
                continue
            except RayError as e:
                failures += 1
                log.error("%s failed on worker %d after retries: %s", job.key, w, str(e).splitlines()[0])
                result = {"id": job.key, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            on_result(job, result)
    return failures


def _lose(alive: set[int], w: int, e: ServerUnavailable, servers: str) -> None:
    """Worker ``w``'s server is gone: no more jobs for it (its other jobs in flight come back the same way); raise
    when it was the last."""
    why = str(getattr(e, "cause", None) or e)  # Ray's error wraps the worker's: its text has the traceback
    if w in alive:
        alive.discard(w)
        if not alive:
            raise ServerUnavailable(f"no server is left ({servers}); the last lost: {why}. Finished items are kept: "
                                    f"resubmit to go on") from None
        log.warning("dropping worker %d: %s; its jobs go to the %d worker(s) left", w, why, len(alive))
