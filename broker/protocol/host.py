"""Which host (and /dev/shm) a process is on: workers use shared memory only for clients on the same one."""

from __future__ import annotations

import functools
import os
import socket


@functools.lru_cache(maxsize=1)
def host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    try:
        shm_dev = os.stat("/dev/shm").st_dev  # two containers on one kernel may still have different /dev/shm
    except OSError:
        shm_dev = -1
    return f"{socket.gethostname()}/{boot}/{shm_dev}"
