"""A same-host shortcut for results: the worker rings the waiting client's doorbell with the result's handle.

A lone request's result otherwise reaches its client through Redis: the worker's RECORD script adds it to the
job's result stream, Redis wakes the client's blocking XREAD. That hop costs two process wake-ups and Redis's
reply parsing, where a datagram on a Unix socket costs one wake-up (benchmarks/hops.py, RESULTS.md run 14). So a
client that reads results by shared memory binds a doorbell (an abstract-namespace Unix datagram socket: it
vanishes with the process, nothing to clean up) and names it in its request; a worker on the same host sends the
handle there the moment the segment is filled (workers.stages.delivery, its one call site), then records the result in
Redis as always. Redis stays the source of truth: the client waits on both at once (`wait_either`), so a result
from a worker that can't ring (another host, another network namespace) or a failure arrives as before.

A ring is taken only from a process of the client's own user (or root), checked by the kernel's credentials on
the datagram, and only for the job the client waits for, whose id only Redis and the client know. A ring for any
other job (a late ring for a job the client took from Redis, a retried job's second result) is dropped and its
segment unlinked, since it was addressed to this client and nobody else will read it.
"""

from __future__ import annotations

import os
import secrets
import select
import socket
import struct
import time
from dataclasses import dataclass

from broker.errors import ProtocolError
from broker.protocol.schemas import BELL_PREFIX, SCHEMA_VERSION, as_dict, decode, packb

MAX_RING_BYTES = 64 * 1024  # a handle is a few hundred bytes; a ring larger than this is not ours
UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass(slots=True)
class Ring:
    """What a worker sends to a client's doorbell: the job and its result's handle (msgpack of
    broker.protocol.schemas.Handle)."""

    job_id: str
    handle: bytes
    version: int = SCHEMA_VERSION

    def to_msgpack(self) -> bytes:
        return packb(as_dict(self))

    @classmethod
    def from_msgpack(cls, data: bytes) -> "Ring":
        ring = decode(cls, data, "doorbell ring")
        if not isinstance(ring.job_id, str) or not isinstance(ring.handle, bytes):
            raise ProtocolError("a doorbell ring must carry a job id (str) and a handle (bytes)")
        return ring


class Doorbell:
    """A client's receiving end. A forked child must not share its parent's (it would take the parent's rings):
    the owner checks `pid` against os.getpid() before use."""

    def __init__(self):
        self.pid = os.getpid()
        self.name = f"{BELL_PREFIX}{self.pid}-{secrets.token_hex(8)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind("\0" + self.name)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # after bind: before, it autobinds
        self.sock.setblocking(False)
        self.uid = os.getuid()

    def fileno(self) -> int:
        return self.sock.fileno()

    def take(self, job_id: str) -> tuple[bytes | None, list[bytes]]:
        """Reads every ring queued from processes of this user (anything else is dropped): (the handle for
        `job_id` or None, the handles of rings for other jobs)."""
        mine, stale = None, []
        while True:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(MAX_RING_BYTES, socket.CMSG_SPACE(UCRED.size))
            except (BlockingIOError, InterruptedError):
                return mine, stale
            if not self._from_own_user(ancillary):
                continue
            try:
                ring = Ring.from_msgpack(data)
            except ProtocolError:
                continue  # not a ring: nothing to act on
            if ring.job_id == job_id and mine is None:
                mine = ring.handle
            else:
                stale.append(ring.handle)

    def _from_own_user(self, ancillary) -> bool:
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(value) >= UCRED.size:
                uid = UCRED.unpack_from(value)[1]
                return uid in (self.uid, 0)
        return False

    def close(self) -> None:
        self.sock.close()


class Ringer:
    """A worker's sending end: one unbound datagram socket, never blocking."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)

    def ring(self, bell: str, job_id: str, handle: bytes) -> bool:
        """True when the ring was queued on the doorbell; False when nobody listens there (its process is gone,
        or in another network namespace) or its queue is full: the client then hears through Redis."""
        try:
            self.sock.sendto(Ring(job_id, handle).to_msgpack(), "\0" + bell)
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


def wait_either(bell: Doorbell, job_id: str, redis_reply, timeout_s: float, stale) -> tuple[str, object]:
    """Waits for `job_id`'s ring on `bell` or for the reply `redis_reply` (broker.protocol.connections.DeferredReplies)
    has outstanding, whichever comes first: ("doorbell", the handle), ("redis", the reply) or ("timeout", None).
    `stale(handle)` gets the handles of rings for other jobs."""
    give_up = time.monotonic() + timeout_s
    # poll, not select: a process with over 1024 descriptors open can't select on them
    poller = select.poll()
    poller.register(bell.fileno(), select.POLLIN)
    poller.register(redis_reply.fileno(), select.POLLIN)
    while (left := give_up - time.monotonic()) > 0:
        ready = {fd for fd, _ in poller.poll(left * 1e3)}
        if bell.fileno() in ready:
            handle, others = bell.take(job_id)
            for h in others:
                stale(h)
            if handle is not None:
                return "doorbell", handle
        if redis_reply.fileno() in ready:
            return "redis", redis_reply.read()[0]
    return "timeout", None
