"""Named POSIX shared-memory segments, created exclusively with mode 0600 and written whole through their file
descriptor, never mapped (`write_segment`); read whole (`read_segment`) or attached for zero-copy views
(`attach_segment`); unlinked by name.

Lifetime of a mapping: every view (numpy array or torch tensor) is built on a memoryview slice of the
segment's mmap object, and holds a reference to it (numpy through `.base`, torch through the storage's
deleter). While any view lives, the mmap can't be closed (`mmap.close()` raises BufferError, which `close()`
swallows); the memory is unmapped when the last view is garbage-collected. So `Segment.close()` and
`Segment.unlink()` never invalidate a view: unlink only removes the name (POSIX keeps the memory until the
last mapping goes), and close only drops the segment's own reference.
"""
from __future__ import annotations

import errno
import math
import mmap
import os
import stat
from collections.abc import Collection

import numpy as np
import posix_ipc

from .errors import ShmError, ShmExistsError, ShmNotFoundError, ShmSpaceError, ShmUntrustedError
from .names import DEFAULT_PREFIX, SHM_DIR, SegmentName, check_prefix

MAX_MARGIN_BYTES = 64 << 20  # free-space safety margin: 5% of /dev/shm, at most this much
NAME_MAX = 255  # bytes of one name in /dev/shm (Linux's NAME_MAX)


def _free_bytes() -> tuple[int, int]:
    """(bytes free in /dev/shm to unprivileged users, safety margin to keep)."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize, min(MAX_MARGIN_BYTES, st.f_blocks * st.f_frsize // 20)


def _bytes_in_use(prefix: str, pid: int) -> int:
    """Bytes held by segments in /dev/shm named with `prefix` and created by `pid`."""
    total = 0
    with os.scandir(SHM_DIR) as it:
        for entry in it:
            parsed = SegmentName.parse(entry.name, prefix)
            if parsed is not None and parsed.pid == pid:
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:  # unlinked while we looked
                    pass
    return total


def _check_free(size: int, name: str = "") -> None:
    free, margin = _free_bytes()
    if size > free - margin:
        raise ShmSpaceError(
            f"shm segment{' ' + name if name else ''}: asked for {size} bytes, {free} free in {SHM_DIR} "
            f"(keeping a {margin}-byte safety margin); free some space or enlarge {SHM_DIR} (docker --shm-size)"
        )


def _check_budget(size: int, prefix: str, max_total_bytes: int, name: str = "", own: int = 0) -> None:
    """Raise unless this process's `prefix` segments plus `size` fit in max_total_bytes.
    `own`: bytes of the new segment itself, already in /dev/shm when checking after creation."""
    used = _bytes_in_use(prefix, os.getpid()) - own
    if used + size > max_total_bytes:
        raise ShmSpaceError(
            f"shm segment{' ' + name if name else ''}: asked for {size} bytes, {max(max_total_bytes - used, 0)} "
            f"free of this process's max_total_bytes={max_total_bytes} budget ({used} bytes in use by its "
            f"'{prefix}' segments); unlink finished segments or raise the budget"
        )


def _posix_name(name: str) -> str:
    """`name` with its leading slash, once it is a name a POSIX segment can have: one component of /dev/shm, no NUL,
    valid UTF-8, at most NAME_MAX bytes. Anything else must not reach posix_ipc, which crashes the process on a
    NUL and resolves a slash as a path."""
    bare = name[1:] if isinstance(name, str) and name.startswith("/") else name
    try:
        ok = isinstance(bare, str) and 0 < len(bare.encode()) <= NAME_MAX and bare not in (".", "..") \
            and "/" not in bare and "\0" not in bare
    except UnicodeEncodeError:  # a lone surrogate
        ok = False
    if not ok:
        raise ShmError(f"{name!r} is not a shared-memory segment name (one name in {SHM_DIR}: no slash after the "
                       f"first, no NUL, 1-{NAME_MAX} bytes)")
    return "/" + bare


def unlink_segment(name: str) -> bool:
    """Remove a name; True if we removed it, False if it was already gone. A name no segment can have is a
    ShmError (nothing is removed)."""
    name = _posix_name(name)
    try:
        posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False


class Segment:
    """One attached (mapped) segment. `size` is the size of the object (a segment created with size 0 is 1 byte).
    Python's mmap keeps a duplicate file descriptor until the mapping goes: close segments you are done with."""

    __slots__ = ("name", "size", "writable", "_mm")

    def __init__(self, name: str, size: int, mm: mmap.mmap, writable: bool):
        self.name, self.size, self.writable, self._mm = name, size, writable, mm

    def __repr__(self) -> str:
        state = "closed" if self._mm is None else ("rw" if self.writable else "ro")
        return f"Segment({self.name!r}, size={self.size}, {state})"

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # closing only: unlinking is the reader's explicit decision

    def _span(self, offset: int, nbytes: int) -> memoryview:
        if self._mm is None:
            raise ShmError(f"shm segment {self.name} is closed")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"shm segment {self.name}: bytes [{offset}, {offset + nbytes}) outside [0, {self.size})")
        return memoryview(self._mm)[offset:offset + nbytes]

    def numpy(self, offset: int, shape, dtype) -> np.ndarray:
        """Zero-copy numpy view of `shape`/`dtype` at byte `offset` (read-only if the segment is)."""
        dtype, shape = np.dtype(dtype), _shape(shape)
        count = math.prod(shape)
        span = self._span(offset, count * dtype.itemsize)
        arr = np.frombuffer(span, dtype=dtype, count=count).reshape(shape)
        if not self.writable:
            arr.flags.writeable = False
        return arr

    def torch(self, offset: int, shape, dtype):
        """Zero-copy torch tensor of `shape`/`dtype` (e.g. torch.bfloat16) at byte `offset`.

        Tensors have no read-only flag: on a read-only attach the mapping is private copy-on-write, so an
        in-place op changes only this process's copy of the touched pages, never the segment."""
        import torch

        shape = _shape(shape)
        count = math.prod(shape)
        span = self._span(offset, count * dtype.itemsize)
        if count == 0:  # torch.frombuffer refuses empty buffers
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(span, dtype=dtype, count=count).view(shape)

    def close(self) -> None:
        """Drop this object's mapping. Idempotent. Views made from it stay valid (they keep the mmap alive)."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views exist: the mmap is unmapped when the last of them is freed
                pass

    def unlink(self) -> None:
        """Remove the name from /dev/shm. Idempotent; a name already removed (by anyone) is not an error.
        Existing mappings and views stay valid; new attaches fail with ShmNotFoundError."""
        unlink_segment(self.name)


def _shape(shape) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)


def _checked_request(size, ttl_s: float, prefix: str, max_total_bytes: int | None) -> int:
    """The size of a new segment as an int, once the arguments are valid and the space and the budget hold it."""
    if not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"shm segment size must be an int >= 0, got {size!r}")
    if not ttl_s > 0:
        raise ValueError(f"shm segment ttl_s must be > 0, got {ttl_s!r}")
    check_prefix(prefix)
    size = int(size)
    _check_free(size)
    if max_total_bytes is not None:
        _check_budget(size, prefix, max_total_bytes)
    return size


def write_segment(size: int, ttl_s: float, prefix: str = DEFAULT_PREFIX, parts=(), *,
                  max_total_bytes: int | None = None) -> str:
    """Create a new, uniquely named segment of `size` bytes, readable and writable by this user only, holding `parts`,
    (byte offset, bytes-like) pairs, zeros elsewhere; return its name. Written through the file descriptor, never
    mapped: no page faults for the writer, and a /dev/shm that fills up mid-write is an error (ShmSpaceError,
    nothing left behind), never a SIGBUS, so no space is reserved (zeroed) first."""
    size = _checked_request(size, ttl_s, prefix, max_total_bytes)
    name = SegmentName.new(ttl_s, prefix).format()
    mem = _open_exclusive(name)
    try:
        os.fchmod(mem.fd, 0o600)
        os.ftruncate(mem.fd, max(size, 1))  # readers see the whole size; an empty result is 1 byte, as mapped
        if max_total_bytes is not None:  # again, now counting ourselves: catches a concurrent create
            _check_budget(size, prefix, max_total_bytes, name=name, own=max(size, 1))
        _write_parts(mem.fd, name, size, parts)
    except OSError as e:
        unlink_segment(name)
        if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            free = _free_bytes()[0]
            raise ShmSpaceError(f"shm segment {name}: writing {size} bytes failed ({e.strerror}); "
                                f"{free} bytes free in {SHM_DIR}") from e
        raise ShmError(f"shm segment {name}: writing failed: {e}") from e
    except BaseException:
        unlink_segment(name)
        raise
    finally:
        mem.close_fd()
    return name


def _write_parts(fd: int, name: str, size: int, parts) -> None:
    for offset, data in parts:
        view = memoryview(data).cast("B")
        if offset < 0 or offset + len(view) > size:
            raise ValueError(f"shm segment {name}: part [{offset}, {offset + len(view)}) outside [0, {size})")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)


def _open_exclusive(name: str) -> posix_ipc.SharedMemory:
    try:
        return posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)  # size=0: no ftruncate
    except posix_ipc.ExistentialError:
        raise ShmExistsError(f"shm segment {name} already exists; creation is exclusive") from None


def _check_trusted(name: str, st: os.stat_result, owners: Collection[int], size: int | None) -> None:
    """Raises ShmUntrustedError unless the segment is owned by one of `owners`, has mode 0600 (as every segment
    is created) and, when given, has `size` bytes. Checked on the descriptor that is then read: a name swapped
    after the check can't slip in."""
    if st.st_uid not in owners:
        raise ShmUntrustedError(f"shm segment {name} is owned by uid {st.st_uid}, not by this process's uid "
                                f"{os.getuid()} or a uid it trusts ({', '.join(map(str, sorted(owners)))})")
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o600:
        raise ShmUntrustedError(f"shm segment {name} has mode {mode:04o}, not 0600: others could have written it")
    if size is not None and st.st_size != size:
        raise ShmUntrustedError(f"shm segment {name} holds {st.st_size} bytes, not the {size} it was said to hold")


def _open_existing(name: str, writable: bool, owners: Collection[int] | None = None,
                   size: int | None = None) -> tuple[str, posix_ipc.SharedMemory, int]:
    """(the name with its leading slash, the open segment, its size); the caller closes the descriptor. With
    `owners`, the segment must be trusted (_check_trusted) or ShmUntrustedError is raised."""
    name = _posix_name(name)
    try:
        mem = posix_ipc.SharedMemory(name, 0, read_only=not writable)
    except posix_ipc.ExistentialError:
        raise ShmNotFoundError(f"shm segment {name} not found: already unlinked by a reader, swept after "
                               f"expiry, or never created") from None
    except posix_ipc.PermissionsError as e:
        raise ShmError(f"shm segment {name}: permission denied ({e}); segments are 0600, attach as the "
                       f"creator's user") from None
    try:
        st = os.fstat(mem.fd)
        if owners is not None:
            _check_trusted(name, st, owners, size)
        size = st.st_size
        if size == 0:
            raise ShmError(f"shm segment {name} has no space reserved yet (its creator is mid-create or died)")
    except BaseException:
        mem.close_fd()
        raise
    return name, mem, size


def read_segment(name: str, *, owners: Collection[int] | None = None, size: int | None = None) -> bytearray:
    """A copy of a segment's bytes, read through its file descriptor: one read, no mapping (a mapping's page
    faults cost more than the copy for results of ~100 KB and up). With `owners` (uids), only a segment one of
    them owns, of mode 0600 and (if given) `size` bytes is read; anything else raises ShmUntrustedError."""
    name, mem, size = _open_existing(name, writable=False, owners=owners, size=size)
    try:
        data = bytearray(size)
        view, done = memoryview(data), 0
        while done < size:  # a read may return less than asked
            n = os.preadv(mem.fd, [view[done:]], done)
            if n == 0:
                raise ShmError(f"shm segment {name} shrank while being read ({done} of {size} bytes)")
            done += n
        return data
    finally:
        mem.close_fd()


def attach_segment(name: str, writable: bool = False, *, owners: Collection[int] | None = None,
                   size: int | None = None) -> Segment:
    """Map an existing segment. Read-only by default (a private copy-on-write mapping of an O_RDONLY fd).
    `owners` and `size`: as read_segment's."""
    name, mem, size = _open_existing(name, writable, owners=owners, size=size)
    try:
        mm = mmap.mmap(mem.fd, size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_COPY)
    finally:
        mem.close_fd()
    return Segment(name, size, mm, writable=writable)
