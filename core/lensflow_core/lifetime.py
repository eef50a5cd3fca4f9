"""A process that ends with its parent: Linux's ``prctl(PR_SET_PDEATHSIG)``.

Used by the operator's tool for every child it starts (so a ``kill -9`` of ``lensflow up``
takes its servers with it) and by the predict function's server worker (uvicorn workers
do not watch their gunicorn arbiter, as gthread workers do). Elsewhere than Linux it does
nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Loaded here, not in a child just forked from a threaded parent, where dlopen can hang.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def end_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent ends; if the
    parent (``parent_pid``) has ended already, send it now."""
    if _libc is None:
        return
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent_pid:  # it ended before the request took effect
        os.kill(os.getpid(), sig)
