"""Remove segments that their readers will never unlink: expired ones, and those of dead creators."""
from __future__ import annotations

import os
import time

import posix_ipc

from .names import DEFAULT_PREFIX, SHM_DIR, SegmentName, check_prefix


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):  # not a pid this system can have
        return False
    return True


def sweep(prefix: str = DEFAULT_PREFIX, now: float | None = None, grace_s: float = 0.0) -> list[str]:
    """Unlink `prefix` segments in /dev/shm whose expiry has passed, or whose creator pid is dead and whose
    file is at least grace_s old (age from the later of its mtime and ctime). Returns the removed names.

    Live, unexpired segments are left alone; so are names of other formats, names that vanish during the scan,
    and other users' segments. A creator in another pid namespace sharing /dev/shm looks dead from here: give
    such setups a grace_s, or rely on expiry alone. `now` is seconds since the epoch (default: time.time())."""
    check_prefix(prefix)
    now = time.time() if now is None else now
    with os.scandir(SHM_DIR) as it:
        entries = list(it)
    removed = []
    for entry in entries:
        parsed = SegmentName.parse(entry.name, prefix)
        if parsed is None:
            continue
        if not parsed.expired(now):
            if pid_alive(parsed.pid):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if now - max(st.st_mtime, st.st_ctime) < grace_s:
                continue
        name = "/" + entry.name
        try:
            posix_ipc.unlink_shared_memory(name)
        except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):  # gone already, or not ours to remove
            continue
        removed.append(name)
    return removed
