"""A same-host shortcut for results: the worker rings the waiting client's doorbell with the result's handle.

A lone request's result otherwise reaches its client through Redis: the worker's RECORD script adds it to the
job's result stream, Redis wakes the client's blocking XREAD. That hop costs two process wake-ups and Redis's
reply parsing (~0.5 ms between idle processes on an H100 host, against ~0.1 ms for a datagram on a Unix socket,
which costs one wake-up: benchmarks/hops.py, RESULTS.md run 14). So a client that reads results by shared memory
binds a doorbell (an abstract-namespace Unix datagram socket: it vanishes with the process, nothing to clean up)
and names it in its request; a worker on the same host sends the handle there the moment the segment is filled,
then records the result in Redis as always. Redis stays the source of truth: the client waits on both at once
(broker.rq_wire), so a result from a worker that can't ring (another host, another network namespace, an older
version) or a failure arrives as before, and the RQ registries are written as before, a moment after the client
has its result.

A ring is taken only from a process of the client's own user (or root), checked by the kernel's credentials on
the datagram, and only for the job the client waits for, whose id only Redis and the client know. A ring for any
other job (a late ring for a job the client took from Redis, a retried job's second result) is dropped and its
segment unlinked, since it was addressed to this client and nobody else will read it.

The way in has the same shortcut: a worker binds a doorbell too and advertises it in Redis (worker_bells_key).
While the queue is about empty, a client on its host rings one of them (in turns) with the job's id and its
request (when small), then enqueues the job without a wake-up token. An idle worker runs the request at once and
claims the job from the queue while it runs (workers.worker.EncoderWorker._take_rung); a busy one hands it on
with a wake-up token through Redis. The job itself still goes through the queue and its registries, and only a
claimed job's result is delivered: a ring for a job already taken claims nothing (the run is dropped), and a job
rung without a wake-up token is still taken by any worker's next take (workers.job_source TAKE leaves a token
while jobs remain).
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass

from broker.errors import ProtocolError
from broker.schemas import BELL_PREFIX, SCHEMA_VERSION, as_dict, decode, is_bell_name, packb

MAX_RING_BYTES = 64 * 1024  # a handle is a few hundred bytes; a ring larger than this is not ours
MAX_RUNG_REQUEST_BYTES = 32 * 1024  # a larger request (images) is rung without it: the worker reads it from Redis
UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
WORKER_BELL_TTL_S = 30  # a worker's advertised doorbell lapses this long after its last heartbeat
MAX_WORKER_BELLS = 16  # a client rings at most this many of its host's workers


@dataclass(slots=True)
class Ring:
    """What a worker sends to a client's doorbell: the job and its result's handle (msgpack of
    broker.schemas.Handle); what a client sends to a worker's: the job, its request and when it was sent."""

    job_id: str
    handle: bytes = b""  # b"" rings a worker: a job to claim
    request: bytes = b""  # a ring to a worker may carry the job's request, to work on while the claim runs
    sent_at: float = 0.0  # unix seconds (one host: one clock); a worker runs ahead only a ring it hears at once
    version: int = SCHEMA_VERSION

    def to_msgpack(self) -> bytes:
        return packb(as_dict(self))

    @classmethod
    def from_msgpack(cls, data: bytes) -> "Ring":
        ring = decode(cls, data, "doorbell ring")
        if not isinstance(ring.job_id, str) or not isinstance(ring.handle, bytes) or \
                not isinstance(ring.request, bytes) or not isinstance(ring.sent_at, (int, float)):
            raise ProtocolError("a doorbell ring must carry a job id (str), a handle and a request (bytes) and "
                                "the time it was sent")
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
        """Reads every ring queued: (the handle for `job_id` or None, the handles of rings for other jobs)."""
        mine, stale = None, []
        for ring in self.drain():
            if ring.job_id == job_id and mine is None:
                mine = ring.handle
            else:
                stale.append(ring.handle)
        return mine, stale

    def drain(self) -> list[Ring]:
        """Every ring queued, from processes of this user; anything else is dropped."""
        rings = []
        while True:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(MAX_RING_BYTES, socket.CMSG_SPACE(UCRED.size))
            except (BlockingIOError, InterruptedError):
                return rings
            if not self._from_own_user(ancillary):
                continue
            try:
                rings.append(Ring.from_msgpack(data))
            except ProtocolError:
                continue  # not a ring: nothing to act on

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

    def ring(self, bell: str, job_id: str, handle: bytes = b"", request: bytes = b"") -> bool:
        """True when the ring was queued on the doorbell; False when nobody listens there (its process is gone,
        or in another network namespace) or its queue is full: the other side then hears through Redis."""
        if len(request) > MAX_RUNG_REQUEST_BYTES:
            request = b""
        try:
            self.sock.sendto(Ring(job_id, handle, request, time.time()).to_msgpack(), "\0" + bell)
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


def worker_bells_key(queue: str) -> str:
    """Hash of the queue's workers' doorbells: name -> "<host id> <unix seconds it lapses at>"."""
    return f"eb:bells:{queue}"


def advertise_bell(pipe, queue: str, bell: str, host: str) -> None:
    """A worker's doorbell, for clients on its host to ring (refreshed with each heartbeat)."""
    key = worker_bells_key(queue)
    pipe.hset(key, bell, f"{host} {time.time() + WORKER_BELL_TTL_S:.0f}")
    pipe.expire(key, WORKER_BELL_TTL_S)


def local_bells(advertised: dict, host: str, now: float | None = None) -> list[str]:
    """The doorbells of `advertised` (worker_bells_key's hash) on `host` that have not lapsed."""
    now = time.time() if now is None else now
    bells = []
    for name, value in advertised.items():
        name, value = (x.decode() if isinstance(x, bytes) else x for x in (name, value))
        where, _, lapses = value.rpartition(" ")
        try:
            alive = float(lapses) > now
        except ValueError:
            alive = False
        if where == host and alive and is_bell_name(name):
            bells.append(name)
    return bells[:MAX_WORKER_BELLS]
