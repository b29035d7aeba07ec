"""The Redis side of a worker: take jobs in batches, record them started, finished or failed.

Jobs and registries keep RQ's layout (rq:job:<id>, rq:queue:<q> and its intermediate list, rq:wip:<q> started
registry with executions, rq:finished:<q>, rq:failed:<q>, rq:results:<id> streams), so rq-dashboard, `rq info`
and RQ's own abandoned-job cleanup read them as they read RQ's. But where RQ spends ~70 commands a job, a batch
here costs three script calls, with the bookkeeping done inside Redis: TAKE (move ids, read the jobs, mark them
started; an idle worker's TAKE rides behind its blocking wait for a wake-up, in the same round trip, or claims
the one job a client on its host rang it with), RECORD
(results and registries: the waiting clients are answered when it ends) and STATS (the batch's counters).
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime

import redis

from broker.connections import discard_connection
from broker.enqueue import HAND_ON_SCRIPT, job_key, queue_key, wake_key
from broker.errors import BrokerError
from broker.queues import ENCODE_FUNCTION
from broker.recovery import RECOVER_SCRIPT, recover_args
from broker.schemas import EncodeRequest
from broker.serializer import InflateLimitExceeded, MsgpackSerializer, inflate

log = logging.getLogger("workers")
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)
CLAIM_WAIT_S, CLAIM_RETRY_S = 0.02, 0.0002  # see JobSource._claim_when_enqueued
HAND_ON_MARK_TTL_S = 60  # a rung job's enqueue comes within ms of its ring, or never
# a job record's data is [function, None, [payload], {}]: the payload plus its function's name and msgpack framing
JOB_DATA_FRAMING_BYTES = 4096

# Lua: Redis's clock as (unix seconds, RQ's text form): a take pipelined behind a blocking wait runs when the wait
# ends, so the time must be read there, not when the worker sent the pipeline.
LUA_RQ_NOW = """
local function rq_now()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  local days, sod = math.floor(s / 86400), s % 86400
  local z = days + 719468  -- civil date from days since 1970-01-01 (H. Hinnant's algorithm)
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return s + us / 1e6, string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06dZ', y, m, d, math.floor(sod / 3600),
                                     math.floor(sod % 3600 / 60), sod % 60, us)
end
"""

# KEYS: queue, its intermediate list, started registry (rq:wip:<q>), the worker's executions set, the queue's
# wake-up list (broker.enqueue.wake_key).
# ARGV: how many more ids to take, an id to claim first ('' if none: taken only if it is still queued; a client
# rang this worker with it, see broker.doorbell), worker name, heartbeat ttl, execution id prefix.
# Moves the ids to the intermediate list (RQ's reliable-dequeue list), marks every job that still exists started
# (job status, an execution with its registries, the started registry scored by the heartbeat deadline) as RQ's
# worker does, takes it off the intermediate list, and returns id, execution id, enqueued_at, data and meta per
# job. Empties the wake-up list once the queue is empty (no worker needs waking for jobs already taken), and
# leaves a token on it while jobs remain (a job rung to a worker comes without one: see broker.doorbell).
TAKE_SCRIPT = LUA_RQ_NOW + """
local ids = {}
if ARGV[2] ~= '' and redis.call('LREM', KEYS[1], 1, ARGV[2]) == 1 then ids[1] = ARGV[2] end
for i = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  ids[#ids + 1] = id
end
if redis.call('LLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[5])
elseif redis.call('LLEN', KEYS[5]) == 0 then
  redis.call('LPUSH', KEYS[5], '1')
end
local now, now_text = rq_now()
local ttl = tonumber(ARGV[4])
local out = {}
for i, id in ipairs(ids) do
  local jkey = 'rq:job:' .. id
  local fields = redis.call('HMGET', jkey, 'enqueued_at', 'data', 'meta')
  local exec_id = ''
  if redis.call('EXISTS', jkey) == 1 then
    exec_id = ARGV[5] .. i
    local composite = id .. ':' .. exec_id
    redis.call('HSET', jkey, 'status', 'started', 'started_at', now_text, 'last_heartbeat', now_text,
               'worker_name', ARGV[3])
    redis.call('PERSIST', jkey)
    local ekey = 'rq:execution:' .. composite
    redis.call('HSET', ekey, 'id', exec_id, 'job_id', id, 'created_at', now, 'last_heartbeat', now,
               'worker_name', ARGV[3])
    redis.call('EXPIRE', ekey, ttl)
    redis.call('ZADD', 'rq:executions:' .. id, math.floor(now) + ttl + 60, exec_id)
    redis.call('EXPIRE', 'rq:executions:' .. id, ttl + 60)
    redis.call('ZADD', KEYS[3], now + ttl, composite)
    redis.call('SADD', KEYS[4], composite)
  end
  redis.call('LREM', KEYS[2], 1, id)
  out[#out + 1] = id
  out[#out + 1] = exec_id
  out[#out + 1] = fields[1] or ''
  out[#out + 1] = fields[2] or ''
  out[#out + 1] = fields[3] or ''
end
if #ids > 0 then redis.call('EXPIRE', KEYS[4], ttl + 60) end
return out
"""

# KEYS: started registry, finished registry, failed registry, the worker's executions set.
# ARGV: result ttl, worker name, #done, #failed,
# then per done job: id, execution id, return value (b64, RQ's result format);
# per failed job: id, execution id, exc_string (b64 of zlib, RQ's format), exc_info (zlib).
# A client waiting on a result stream is answered once this whole script has run: it holds nothing else.
RECORD_SCRIPT = LUA_RQ_NOW + """
local now, now_text = rq_now()  -- the clock that stamped started_at (TAKE)
local ttl, worker = tonumber(ARGV[1]), ARGV[2]
local n_done, n_failed = tonumber(ARGV[3]), tonumber(ARGV[4])
local function end_execution(id, exec_id)
  if exec_id == '' then return end
  local composite = id .. ':' .. exec_id
  redis.call('DEL', 'rq:execution:' .. composite)
  redis.call('ZREM', KEYS[1], composite)
  redis.call('ZREM', 'rq:executions:' .. id, exec_id)
  redis.call('SREM', KEYS[4], composite)
end
-- ends a job as RQ does: status, its result entry (RQ's result types: 1 finished, 2 failed), a registry
local function end_job(id, exec_id, status, extra, result_type, result_field, result, registry)
  local jkey, rkey = 'rq:job:' .. id, 'rq:results:' .. id
  redis.call('HSET', jkey, 'status', status, 'ended_at', now_text, unpack(extra))
  redis.call('EXPIRE', jkey, ttl)
  redis.call('XADD', rkey, 'MAXLEN', '10', '*', 'type', result_type, 'worker_name', worker, result_field, result,
             'execution_id', exec_id)
  redis.call('EXPIRE', rkey, ttl)
  redis.call('ZADD', registry, now + ttl, id)
  end_execution(id, exec_id)
end
local a = 5
for _ = 1, n_done do
  end_job(ARGV[a], ARGV[a + 1], 'finished', {}, '1', 'return_value', ARGV[a + 2], KEYS[2])
  a = a + 3
end
for _ = 1, n_failed do
  end_job(ARGV[a], ARGV[a + 1], 'failed', {'exc_info', ARGV[a + 3]}, '2', 'exc_string', ARGV[a + 2], KEYS[3])
  a = a + 4
end
return n_done + n_failed
"""

# KEYS: the worker's stats hash, the queue's latency list. ARGV: now, #stat pairs, the field/increment pairs,
# then latencies (ms).
STATS_SCRIPT = """
local n_stats = tonumber(ARGV[2])
local a = 3
for _ = 1, n_stats do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[a], ARGV[a + 1])
  a = a + 2
end
redis.call('HSET', KEYS[1], 'last_batch_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], 86400)
if a <= #ARGV then
  redis.call('LPUSH', KEYS[2], unpack(ARGV, a))
  redis.call('LTRIM', KEYS[2], 0, 1999)
  redis.call('EXPIRE', KEYS[2], 86400)
end
return n_stats
"""


@dataclass(slots=True)
class TakenJob:
    """A job taken off the queue and marked started: either a valid request or the reason it can't run."""

    job_id: str
    exec_id: str  # its RQ execution ('' when the job record had vanished)
    request: object | None = None  # the parsed request (EncodeRequest for encoder workers)
    error: str | None = None
    enqueued_at: float | None = None  # unix seconds, from the job record
    meta: dict = field(default_factory=dict)
    taken_at: float = field(default_factory=time.time)
    rung: bool = False  # claimed when its client rang this worker (broker.doorbell), not woken through Redis
    payload: bytes = b""  # the request as the client packed it (what a ring may carry ahead of the claim)

    @property
    def key(self) -> str:
        return f"rq:job:{self.job_id}"

    @property
    def composite_key(self) -> str:
        return f"{self.job_id}:{self.exec_id}"


@dataclass(slots=True)
class PackedClaim:
    """JobSource.claim's commands for `job_ids`, packed for the wire."""

    job_ids: list[str]
    commands: list


@dataclass(slots=True)
class StatsUpdate:
    """Counters to add to a worker's stats hash and latencies for the queue's list, written with a RECORD."""

    key: str
    latency_key: str
    increments: dict = field(default_factory=dict)
    latencies_ms: list = field(default_factory=list)


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _rq_timestamp(value) -> float | None:
    try:
        return datetime.fromisoformat(_text(value)).timestamp() if value else None
    except ValueError:
        return None


class JobSource:
    """Jobs of one queue that name `function` and carry one msgpack request that `parse_request` reads."""

    def __init__(self, connection: redis.Redis, queue: str, worker_name: str, max_payload_bytes: int,
                 function: str = ENCODE_FUNCTION, parse_request=EncodeRequest.from_msgpack):
        self.connection = connection
        self.function = function
        self.parse_request = parse_request
        self.queue = queue
        self.queue_key = queue_key(queue)
        self.intermediate_key = f"rq:intermediate:{queue}"
        self.started_key = f"rq:wip:{queue}"
        self.finished_key = f"rq:finished:{queue}"
        self.failed_key = f"rq:failed:{queue}"
        self.executions_key = f"rq:worker:{worker_name}:executions"
        self.wake_key = wake_key(queue)
        self._take_keys = [self.queue_key, self.intermediate_key, self.started_key, self.executions_key, self.wake_key]
        self.worker_name = worker_name
        self.max_payload_bytes = max_payload_bytes
        self._take = connection.register_script(TAKE_SCRIPT)
        self._hand_on = connection.register_script(HAND_ON_SCRIPT)
        self._record = connection.register_script(RECORD_SCRIPT)
        self._stats = connection.register_script(STATS_SCRIPT)
        self._recover = connection.register_script(RECOVER_SCRIPT)
        self._exec_prefix = secrets.token_hex(6)
        self._exec_count = 0
        self._wait_conn = None  # begin_wait's connection (a blocking wait holds it)
        self._claim_conn = None  # claim's connection (EVAL sent as packed ahead, replies read)
        self._waiting = False

    # -- taking --------------------------------------------------------------------------------------
    def wait_and_take(self, more: int, heartbeat_ttl: int, timeout_s: float) -> list[TakenJob]:
        """Blocks until a client's enqueue wakes this worker or `timeout_s` passes, then takes up to `more` jobs
        (as `take`), in one round trip: the take is pipelined behind the blocking pop of the queue's wake-up
        list. A job pushed without a wake-up (by another enqueuer) is still taken within `timeout_s`. Redis
        checks blocking timeouts only every ~100 ms: use this for waits of a second or so."""
        self.begin_wait(more, heartbeat_ttl, timeout_s)
        return self.end_wait(block=True)

    def begin_wait(self, more: int, heartbeat_ttl: int, timeout_s: float) -> None:
        """`wait_and_take` in two halves, on a connection of its own: this sends the wait (unless one is under
        way); `end_wait` reads what it took. In between, `wait_socket` turns readable when it has ended."""
        if self._waiting:
            return
        if self._wait_conn is None:
            self._wait_conn = self.connection.connection_pool.get_connection()
        conn = self._wait_conn
        try:
            conn.send_packed_command(conn.pack_commands([
                ("BLPOP", self.wake_key, timeout_s),
                ("EVAL", TAKE_SCRIPT, 5, *self._take_keys, *self._take_args("", more, heartbeat_ttl))]))
        except CONNECTION_ERRORS:
            self._drop_wait_connection()
            raise
        self._waiting = True

    def wait_socket(self):
        return self._wait_conn._sock

    def end_wait(self, block: bool = False) -> list[TakenJob] | None:
        """The jobs the wait took ([] if none came in time); None if it is still waiting (and not `block`).
        Jobs taken are started: whoever begins a wait must end it, or they wait for recovery."""
        if not self._waiting:
            return []
        conn = self._wait_conn
        try:
            if not block and not conn.can_read(timeout=0):
                return None
            self._waiting = False
            conn.read_response()  # the wake-up token, or None when the wait timed out
            flat = conn.read_response()
        except CONNECTION_ERRORS:
            self._drop_wait_connection()
            raise
        return self._parse_taken(flat)

    def _drop_wait_connection(self) -> None:
        discard_connection(self.connection.connection_pool, self._wait_conn)
        self._wait_conn = None
        self._waiting = False

    def take(self, first_id: str | None, more: int, heartbeat_ttl: int) -> list[TakenJob]:
        """Up to `more` jobs (after `first_id`, if that is still queued), each marked started with
        `heartbeat_ttl`: from here on a job whose worker dies is found by broker.recovery. Jobs whose record
        vanished (expired) are dropped."""
        return self._parse_taken(self._take(keys=self._take_keys,
                                            args=self._take_args(first_id or "", more, heartbeat_ttl)))

    def pack_claim(self, job_ids: list[str], heartbeat_ttl: int) -> "PackedClaim":
        """`claim`'s commands, packed ahead: what is left to do when it runs is sending and waiting (no Python
        work to hold the GIL then, while the compute thread starts on the rung jobs)."""
        conn = self._claim_connection()
        return PackedClaim(job_ids, conn.pack_commands(
            [("EVALSHA", self._take.sha, 5, *self._take_keys, *self._take_args(job_id, 0, heartbeat_ttl))
             for job_id in job_ids]))

    def claim(self, job_ids: list[str], heartbeat_ttl: int, packed: "PackedClaim | None" = None) -> list[TakenJob]:
        """The jobs clients on this host rang this worker with (broker.doorbell) that are still queued, taken:
        not those another worker took, nor those whose enqueue never ran (refused, or the client lost Redis).
        A ring goes out before its client's enqueue: a job not in Redis yet is waited for a moment."""
        packed = packed or self.pack_claim(job_ids, heartbeat_ttl)
        conn = self._claim_connection()
        replies = []
        try:
            conn.send_packed_command(packed.commands)
            for _ in packed.job_ids:
                try:
                    replies.append(conn.read_response())
                except redis.exceptions.NoScriptError:  # Redis restarted: the script loads on the next take
                    replies.append(None)
        except BaseException:  # replies left unread would answer the next claims: start afresh
            self._drop_claim_connection()
            raise
        taken = []
        for job_id, flat in zip(packed.job_ids, replies):
            got = self.take(job_id, 0, heartbeat_ttl) if flat is None else self._parse_taken(flat)
            got = got or self._claim_when_enqueued(job_id, heartbeat_ttl)
            for t in got:
                t.rung = True
            taken += got
        return taken

    def _claim_connection(self):
        if self._claim_conn is None:
            self._claim_conn = self.connection.connection_pool.get_connection()
        return self._claim_conn

    def _drop_claim_connection(self) -> None:
        discard_connection(self.connection.connection_pool, self._claim_conn)
        self._claim_conn = None

    def _claim_when_enqueued(self, job_id: str, heartbeat_ttl: int) -> list[TakenJob]:
        """Claims `job_id` again while its record does not exist yet, for up to CLAIM_WAIT_S. If it never shows,
        it is handed on: should its enqueue still run, a worker takes it."""
        give_up = time.monotonic() + CLAIM_WAIT_S
        while not self.connection.exists(job_key(job_id)):
            if time.monotonic() > give_up:
                self.hand_on([job_id])
                return []
            time.sleep(CLAIM_RETRY_S)
        return self.take(job_id, 0, heartbeat_ttl)  # [] when another worker has it

    def hand_on(self, job_ids: list[str]) -> None:
        """Jobs rung to this worker that it will not claim (busy, or stopping) are left to whichever worker takes
        next, this one included: a wake-up token for each (at once, or at its enqueue: see HAND_ON_SCRIPT)."""
        if job_ids:
            self._hand_on(keys=[self.wake_key], args=[HAND_ON_MARK_TTL_S, *job_ids])

    def _take_args(self, first_id: str, more: int, heartbeat_ttl: int) -> list:
        self._exec_count += 1
        return [max(0, more), first_id, self.worker_name, heartbeat_ttl, f"{self._exec_prefix}{self._exec_count}x"]

    def _parse_taken(self, flat: list) -> list[TakenJob]:
        taken = []
        for i in range(0, len(flat), 5):
            job_id, exec_id, enqueued_at, data, meta = flat[i:i + 5]
            if exec_id:  # '' when the job's record had vanished (expired)
                taken.append(self._parse(_text(job_id), _text(exec_id), enqueued_at, data, meta))
        return taken

    def _parse(self, job_id: str, exec_id: str, enqueued_at: bytes, data: bytes, meta: bytes) -> TakenJob:
        t = TakenJob(job_id, exec_id, enqueued_at=_rq_timestamp(enqueued_at))
        if meta:
            try:
                t.meta = MsgpackSerializer.loads(meta)
            except Exception:
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
            return t
        if func != self.function:
            t.error = f"refused: this worker runs only {self.function}, not {func!r}"
        elif not (isinstance(args, (list, tuple)) and len(args) == 1 and isinstance(args[0], bytes)):
            t.error = "job arguments must be one msgpack-encoded request"
        elif len(args[0]) > self.max_payload_bytes:
            t.error = f"payload is {len(args[0])} bytes, over max_payload_bytes {self.max_payload_bytes}"
        else:
            t.payload = args[0]
            try:
                t.request = self.parse_request(args[0]).validate()
            except BrokerError as e:
                t.error = f"{type(e).__name__}: {e}"
            else:
                deadline = getattr(t.request, "deadline", 0)
                if deadline and deadline < time.time():
                    t.error = "client deadline passed before the job started: not computed"
        return t

    # -- while running -------------------------------------------------------------------------------
    def refresh(self, jobs: list[TakenJob], heartbeat_ttl: int, pipe) -> None:
        """Pushes the heartbeat deadline of jobs this worker still holds (only entries still there)."""
        deadline = time.time() + heartbeat_ttl
        entries = {t.composite_key: deadline for t in jobs if t.exec_id}
        if entries:
            pipe.zadd(self.started_key, entries, xx=True)
            for t in jobs:
                if t.exec_id:
                    pipe.expire(f"rq:execution:{t.composite_key}", heartbeat_ttl + 60)

    def write_meta(self, t: TakenJob, updates: dict, pipeline=None) -> None:
        """Merges `updates` into the job's RQ meta and writes it (one HSET of the msgpack'd `meta` field)."""
        t.meta.update(updates)
        (pipeline if pipeline is not None else self.connection).hset(t.key, "meta", MsgpackSerializer.dumps(t.meta))

    # -- recording -----------------------------------------------------------------------------------
    def record(self, done: list[tuple[TakenJob, bytes]], failed: list[tuple[TakenJob, str]], result_ttl: int,
               stats: StatsUpdate | None = None) -> None:
        """Finished jobs (their return value: msgpack bytes) and failed ones (the reason) in one script call,
        then the batch's stats in another: the waiting clients are answered before the stats are counted."""
        if done or failed:
            argv: list = [result_ttl, self.worker_name, len(done), len(failed)]
            for t, value in done:
                argv += [t.job_id, t.exec_id, base64.b64encode(MsgpackSerializer.dumps(value))]
            for t, reason in failed:
                exc = zlib.compress(reason.encode())
                argv += [t.job_id, t.exec_id, base64.b64encode(exc), exc]
            self._record(keys=[self.started_key, self.finished_key, self.failed_key, self.executions_key],
                         args=argv)
        if stats is not None:
            argv = [time.time(), len(stats.increments)]
            for k, v in stats.increments.items():
                argv += [k, v]
            argv += [round(x, 3) for x in stats.latencies_ms]
            try:
                self._stats(keys=[stats.key, stats.latency_key], args=argv)
            except (redis.ConnectionError, redis.TimeoutError) as e:  # the jobs are recorded: only counts are lost
                log.warning("a batch's stats were not recorded (%s)", e)

    def requeue_abandoned(self) -> list[int]:
        """Jobs whose worker stopped heart-beating are retried or failed (broker.recovery); [requeued, failed]."""
        keys, argv = recover_args(self.queue)
        return self._recover(keys=keys, args=argv)
