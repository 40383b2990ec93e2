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
