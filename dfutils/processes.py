"""Worker processes that end with the process that started them.

A `ProcessPoolExecutor`'s workers wait on a queue for work; when their parent is killed
outright (SIGKILL, the out-of-memory killer, a scheduler's hard limit) nobody tells them,
and each waits for ever, holding its memory (the faces step's hold dlib's models, about
600 MB each). On Linux the kernel can send a worker a signal the moment its parent dies
(prctl's PR_SET_PDEATHSIG); the steps' pools ask for SIGKILL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with(parent: int) -> None:
    """Worker initializer: be killed when `parent` dies; exit now if it already has."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool behaves as before
        return
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def usable_cpus() -> int:
    """The cores this process may run on: a cluster task's allocation (SLURM's
    --cpus-per-task, a container's cpuset), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers end with this process."""
    return ProcessPoolExecutor(workers, initializer=_die_with, initargs=(os.getpid(),))
