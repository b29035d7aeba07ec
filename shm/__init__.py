"""Named POSIX shared-memory segments for encoder results (same host).

A worker `write_segment`s one segment per job (exclusive, mode 0600, written through its descriptor) and returns
the name in a handle; `max_total_bytes` caps what one process holds. The client `attach_segment`s the name and
takes zero-copy views (`numpy` / `torch`), or `read_segment`s a copy, and `unlink`s. `sweep` removes what a dead or
slow client left behind. Linux only (names are listed from /dev/shm). Knows nothing of Redis or models; torch
is imported only when a torch view is asked for.
"""
from .errors import ShmError, ShmExistsError, ShmNotFoundError, ShmSpaceError, ShmUntrustedError
from .names import DEFAULT_PREFIX, SHM_DIR, SegmentName
from .segment import Segment, attach_segment, read_segment, unlink_segment, write_segment
from .sweep import sweep

__all__ = [
    "DEFAULT_PREFIX", "SHM_DIR", "Segment", "SegmentName", "ShmError", "ShmExistsError", "ShmNotFoundError",
    "ShmSpaceError", "ShmUntrustedError", "attach_segment", "read_segment", "sweep", "unlink_segment", "write_segment",
]
