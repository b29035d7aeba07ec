"""The Redis side of a worker: take jobs in batches, keep them alive, record them finished or failed.

Jobs and registries keep RQ's layout (broker.protocol.keys), so rq-dashboard, `rq info` and RQ's own abandoned-job
cleanup read them as they read RQ's. Where RQ spends many commands a job, a batch here costs two script calls
(broker/protocol/lua): TAKE (take ids, read the jobs, mark them started), pipelined behind an idle worker's blocking
wait for a wake-up so that one round trip both wakes it and takes the jobs; RECORD (results, registries and the
batch's counters: the waiting clients are answered when it ends). Every field read from Redis is checked with the
job it belongs to: a malformed one fails that job alone.
"""

from __future__ import annotations

import logging
import secrets
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime

import redis

from broker.errors import BrokerError
from broker.protocol import keys
from broker.protocol.connections import CONNECTION_ERRORS
from broker.protocol.queues import ENCODE_FUNCTION
from broker.protocol.schemas import EncodeRequest
from broker.protocol.scripts import SCRIPTS, Scripts, record_args, recover_args, take_args
from broker.protocol.serializer import InflateLimitExceeded, MsgpackSerializer, inflate

log = logging.getLogger("workers")
__all__ = ["CONNECTION_ERRORS", "JobSource", "StatsUpdate", "TakenJob"]
# a job record's data is [function, None, [payload], {}]: the payload plus its function's name and msgpack framing
JOB_DATA_FRAMING_BYTES = 4096


@dataclass(slots=True)
class TakenJob:
    """A job taken off the queue and marked started: either a valid request or the reason it can't run."""

    job_id: str
    exec_id: str  # its RQ execution
    request: object | None = None  # the parsed request (EncodeRequest for encoder workers)
    error: str | None = None
    enqueued_at: float | None = None  # unix seconds, from the job record
    meta: dict = field(default_factory=dict)
    taken_at: float = field(default_factory=time.time)

    @property
    def key(self) -> str:
        return keys.job(self.job_id)

    @property
    def composite_key(self) -> str:
        return f"{self.job_id}:{self.exec_id}"


@dataclass(slots=True)
class StatsUpdate:
    """Counters to add to a worker's stats hash and latencies for the queue's list, written with a RECORD."""

    increments: dict = field(default_factory=dict)
    latencies_ms: list = field(default_factory=list)


def skipped_ids(record_reply: list) -> list[str]:
    """The job ids a RECORD's reply names (jobs answered by an earlier run)."""
    return [x.decode() if isinstance(x, bytes) else x for x in record_reply]


def _rq_timestamp(value: bytes) -> float | None:
    try:
        return datetime.fromisoformat(value.decode()).timestamp() if value else None
    except ValueError:  # UnicodeDecodeError too: a job's queueing time is only for stats
        return None


class JobSource:
    """Jobs of one queue that name `function` and carry one msgpack request that `parse_request` reads."""

    def __init__(self, connection: redis.Redis, queue: str, worker_name: str, max_payload_bytes: int,
                 function: str = ENCODE_FUNCTION, parse_request=EncodeRequest.from_msgpack):
        self.connection = connection
        self.function = function
        self.parse_request = parse_request
        self.queue = queue
        self.keys = keys.QueueKeys(queue)
        self.worker_name = worker_name
        self.max_payload_bytes = max_payload_bytes
        self.scripts = Scripts(connection)
        self.observe = None  # called with each recorded StatsUpdate (the worker's in-process tally)
        self._exec_prefix = secrets.token_hex(6)
        self._exec_count = 0

    # -- taking --------------------------------------------------------------------------------------
    def wait_and_take(self, more: int, heartbeat_ttl: int, timeout_s: float) -> list[TakenJob]:
        """Blocks until a client's enqueue wakes this worker or `timeout_s` passes, then takes up to `more` jobs
        (as `take`), in one round trip: the take is pipelined behind the blocking pop of the queue's wake-up
        list. A job pushed without a wake-up (by another enqueuer) is still taken within `timeout_s`. Redis
        checks blocking timeouts only every ~100 ms: use this for waits of a second or so."""
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.blpop([self.keys.wake], timeout_s)
            SCRIPTS["take"].on_pipeline(pipe, *self._take_args(more, heartbeat_ttl))
            _token, flat = pipe.execute()
        return self._parse_taken(flat)

    def take(self, more: int, heartbeat_ttl: int) -> list[TakenJob]:
        """Up to `more` jobs, each marked started with `heartbeat_ttl`: from here on a job whose worker dies is
        found by RECOVER (broker/protocol/lua/recover.lua). Ids whose record vanished (expired) or is malformed
        are dropped and logged."""
        return self._parse_taken(self.scripts.call("take", *self._take_args(more, heartbeat_ttl)))

    def _take_args(self, more: int, heartbeat_ttl: int) -> tuple[list, list]:
        self._exec_count += 1
        return take_args(self.queue, self.worker_name, more, heartbeat_ttl, f"{self._exec_prefix}{self._exec_count}x")

    def _parse_taken(self, flat: list) -> list[TakenJob]:
        taken = []
        for i in range(0, len(flat), 5):
            job_id, exec_id, enqueued_at, data, meta = flat[i:i + 5]
            if not exec_id:
                log.warning("queue entry %r dropped: %s", job_id, enqueued_at.decode(errors="replace"))
                continue
            t = TakenJob(job_id.decode(), exec_id.decode(), enqueued_at=_rq_timestamp(enqueued_at))
            try:
                self._parse(t, data, meta)
            except Exception as e:  # whatever sits in Redis fails its own job, never the batch
                t.request, t.error = None, f"malformed job record: {type(e).__name__}: {e}"
            taken.append(t)
        return taken

    def _parse(self, t: TakenJob, data: bytes, meta: bytes) -> None:
        if meta:
            try:
                t.meta = MsgpackSerializer.loads(meta)
            except Exception:
                t.meta = {}
            if not isinstance(t.meta, dict):
                t.meta = {}
        try:  # bounded: a zlib bomb is refused before it is inflated whole
            data = inflate(data, self.max_payload_bytes + JOB_DATA_FRAMING_BYTES)
        except InflateLimitExceeded as e:
            t.error = f"job data refused unread: {e} (max_payload_bytes {self.max_payload_bytes} plus framing)"
            return t
        except zlib.error:
            pass  # RQ falls back to uncompressed data too
        try:
            func, _instance, args, _kwargs = MsgpackSerializer.loads(data)
        except Exception:
            t.error = "job data is not msgpack: refused (this worker never unpickles)"
            return
        if func != self.function:
            t.error = f"refused: this worker runs only {self.function}, not {func!r}"
        elif not (isinstance(args, (list, tuple)) and len(args) == 1 and isinstance(args[0], bytes)):
            t.error = "job arguments must be one msgpack-encoded request"
        elif len(args[0]) > self.max_payload_bytes:
            t.error = f"payload is {len(args[0])} bytes, over max_payload_bytes {self.max_payload_bytes}"
        else:
            try:
                t.request = self.parse_request(args[0]).validate()
            except BrokerError as e:
                t.error = f"{type(e).__name__}: {e}"
                return
            deadline = getattr(t.request, "deadline", 0)
            if deadline and deadline < time.time():
                t.request, t.error = None, "client deadline passed before the job started: not computed"

    # -- while running -------------------------------------------------------------------------------
    def refresh(self, jobs: list[TakenJob], heartbeat_ttl: int, pipe) -> None:
        """Pushes the heartbeat deadline of jobs this worker still holds (only entries still there), on `pipe`."""
        deadline = time.time() + heartbeat_ttl
        if jobs:
            pipe.zadd(self.keys.started, {t.composite_key: deadline for t in jobs}, xx=True)
        for t in jobs:
            pipe.expire(keys.execution(t.job_id, t.exec_id), heartbeat_ttl + 60)

    def write_meta(self, t: TakenJob, updates: dict, pipeline=None) -> None:
        """Merges `updates` into the job's RQ meta and writes it (one HSET of the msgpack'd `meta` field)."""
        t.meta.update(updates)
        (pipeline if pipeline is not None else self.connection).hset(t.key, "meta", MsgpackSerializer.dumps(t.meta))

    # -- recording -----------------------------------------------------------------------------------
    def record(self, done: list[tuple[TakenJob, bytes]], failed: list[tuple[TakenJob, str]], result_ttl: int,
               stats: StatsUpdate | None = None, pipe=None) -> list[str] | None:
        """Finished jobs (their return value: msgpack bytes), failed ones (the reason) and the batch's stats in one
        script call; on `pipe` (executed by the caller, its last reply this one's) if given. Returns the ids of
        the jobs not recorded because an earlier run of theirs was (see broker/protocol/lua/record.lua)."""
        stats = stats or StatsUpdate()
        if self.observe is not None:
            self.observe(stats)
        keys_, argv = record_args(self.queue, self.worker_name, result_ttl,
                                  [(t.job_id, t.exec_id, value) for t, value in done],
                                  [(t.job_id, t.exec_id, reason) for t, reason in failed],
                                  stats.increments, stats.latencies_ms)
        if pipe is not None:
            SCRIPTS["record"].on_pipeline(pipe, keys_, argv)
            return None
        return skipped_ids(self.scripts.call("record", keys_, argv))

    def requeue_abandoned(self) -> list[int]:
        """Jobs whose worker stopped heart-beating are retried or failed (RECOVER); [requeued, failed]."""
        return self.scripts.call("recover", *recover_args(self.queue))
