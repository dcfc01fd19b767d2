"""Job leases: who holds a running job (renewed by the worker on a thread of its own), and when a
holder is known to be gone before its lease runs out.

A worker's id is `host:pid`. A holder on this host whose process no longer exists (SIGKILL,
OOM kill, a crash) is dead now: its jobs can be claimed again at once instead of a lease
(default 60 s) later, which is what makes a replacement worker recover at full speed. On
another host only the lease says so.
"""

from __future__ import annotations

import os
import socket

HOSTNAME = socket.gethostname()
WORKER_ID = f"{HOSTNAME}:{os.getpid()}"


def is_dead_local_worker(worker_id: str) -> bool:
    """True only when `worker_id` names a process of this host that is gone (or a zombie):
    any doubt (another host, a pid reused by a live process) counts as alive, and the lease
    decides."""
    host, _, pid = worker_id.rpartition(":")
    if host != HOSTNAME or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (not Linux): ask the kernel
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
