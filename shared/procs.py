"""Child processes that never outlive what started them: one process group each, signalled as a whole.

* :func:`die_with_parent` (a ``preexec_fn``, Linux): the child gets SIGTERM when its parent dies, however it
  dies (SIGKILL, ``os._exit``, the OOM killer), so no ``finally`` is needed for that case;
* :func:`stop_group`: SIGTERM the child's process group, SIGKILL it after a grace period;
* :func:`kill_leftovers`: SIGKILL whatever is still in a finished child's group. A local Ray started by a
  driver that was SIGKILLed leaves its dashboard and runtime-env agents behind, re-parented to init and
  deaf to SIGTERM; they stay in the driver's group, so this ends them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the process that started it dies (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_leftovers(pgid: int) -> bool:
    """SIGKILL every process left in group ``pgid``; True if there were any."""
    if not _group_alive(pgid):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    return True


def stop_group(proc: subprocess.Popen, grace: float, name: str = "child") -> None:
    """SIGTERM ``proc``'s group (it must lead one: ``start_new_session=True``), SIGKILL the group after
    ``grace`` seconds, and reap ``proc``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", name, grace)
    kill_leftovers(proc.pid)
    proc.wait()


def kill_own_group() -> int:
    """SIGKILL every other process in this process's group (the last thing a supervised child does: a local Ray
    it started may leave agents behind even after ``ray.shutdown``, and nothing else would end them when the
    supervisor is gone). Returns how many were signalled."""
    me, pgid, n = os.getpid(), os.getpgid(0), 0
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        with contextlib.suppress(OSError, ProcessLookupError):
            if os.getpgid(int(d)) == pgid:
                os.kill(int(d), signal.SIGKILL)
                n += 1
    return n


SUPERVISED_ENV = "SELFALIGN_SUPERVISED"
SUPERVISED_STOP_GRACE_S = 20.0  # less than the pipeline's grace for a stage, so the supervisor cleans up itself


def supervised(module: str, argv: list[str]) -> int | None:
    """Run ``python -m module argv`` as a child in a process group of its own and wait for it, unless this
    process already is that child (then None: go on and do the work).

    For a command that starts a local Ray: a SIGKILL of the driver leaves Ray's agents behind, and a SIGKILL
    of this supervisor leaves nothing else to clean up. So the child dies with the supervisor (it gets SIGTERM
    and shuts Ray down), SIGINT/SIGTERM are passed on to it, and whatever is left in its group when it ends
    (the agents of a killed driver) is killed. Returns the child's exit code."""
    if os.environ.get(SUPERVISED_ENV) == "1":
        return None
    proc = subprocess.Popen([sys.executable, "-m", module, *argv], env={**os.environ, SUPERVISED_ENV: "1"},
                            start_new_session=True, preexec_fn=die_with_parent)
    asked: list[float] = []  # when a stop was passed on

    def forward(signum: int, frame: object) -> None:
        asked.append(time.monotonic())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if asked and time.monotonic() - asked[0] > SUPERVISED_STOP_GRACE_S:
                    log.warning("%s did not stop within %.0f s; killing it", module, SUPERVISED_STOP_GRACE_S)
                    kill_leftovers(proc.pid)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if kill_leftovers(proc.pid):
            log.warning("%s left processes behind (a killed driver's Ray agents); killed them", module)
    return rc
