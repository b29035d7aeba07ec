"""The Redis side of the encoder worker: take jobs in batches, record started / finished / failed.

Jobs and registries keep RQ's layout (rq:job:<id>, rq:queue:<q> and its intermediate list, rq:wip:<q>
started registry with executions, rq:finished:<q>, rq:failed:<q>, rq:results:<id> streams), so rq-dashboard,
`rq info` and RQ's own abandoned-job cleanup work on them. Each step of a batch is one pipeline.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import redis
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.utils import now, utcformat

from broker.enqueue import queue_key
from broker.errors import BrokerError
from broker.queues import ENCODE_FUNCTION
from broker.recovery import RECOVER_SCRIPT, recover_args
from broker.schemas import EncodeRequest
from broker.serializer import MsgpackSerializer

# Move up to ARGV[1] more ids from the queue to its intermediate list (RQ's reliable-dequeue list) and return
# every taken id with its job hash, the first one (ARGV[2], already moved by BLMOVE) included: one round trip.
TAKE_SCRIPT = """
local ids = {}
if ARGV[2] ~= '' then ids[1] = ARGV[2] end
for i = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  ids[#ids + 1] = id
end
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGETALL', 'rq:job:' .. id)
end
return out
"""


@dataclass(slots=True)
class TakenJob:
    """A job taken off the queue: either a valid request or the reason it can't run."""

    job_id: str
    job: Job | None
    request: object | None = None  # the parsed request (EncodeRequest for encoder workers)
    error: str | None = None
    taken_at: float = field(default_factory=time.time)
    execution: Execution | None = None


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
        self.worker_name = worker_name
        self.max_payload_bytes = max_payload_bytes
        self._take = connection.register_script(TAKE_SCRIPT)
        self._recover = connection.register_script(RECOVER_SCRIPT)
        self.started = StartedJobRegistry(queue, connection=connection, serializer=MsgpackSerializer)
        self.finished = FinishedJobRegistry(queue, connection=connection, serializer=MsgpackSerializer)
        self.failed = FailedJobRegistry(queue, connection=connection, serializer=MsgpackSerializer)

    # -- taking --------------------------------------------------------------------------------------
    def wait_first(self, timeout_s: float) -> str | None:
        """Blocks until one job id is moved to the intermediate list, or the timeout passes."""
        got = self.connection.blmove(self.queue_key, self.intermediate_key, max(timeout_s, 0.001), "LEFT", "RIGHT")
        return got.decode() if isinstance(got, bytes) else got

    def take(self, first_id: str | None, more: int) -> list[TakenJob]:
        flat = self._take(keys=[self.queue_key, self.intermediate_key], args=[max(0, more), first_id or ""])
        taken, vanished = [], []
        for i in range(0, len(flat), 2):
            job_id = flat[i].decode()
            raw = flat[i + 1]
            if not raw:  # expired (the client's ttl) or deleted while queued
                vanished.append(job_id)
                continue
            taken.append(self._parse(job_id, dict(zip(raw[0::2], raw[1::2]))))
        if vanished:
            with self.connection.pipeline(transaction=False) as pipe:
                for job_id in vanished:
                    pipe.lrem(self.intermediate_key, 1, job_id)
                pipe.execute()
        return taken

    def _parse(self, job_id: str, raw: dict) -> TakenJob:
        job = Job(job_id, connection=self.connection, serializer=MsgpackSerializer)
        try:
            job.restore(raw)
        except Exception as e:
            return TakenJob(job_id, None, error=f"job record is unreadable: {e}")
        try:
            func = job.func_name
            args = job.args
        except Exception:
            return TakenJob(job_id, job, error="job data is not msgpack: refused (this worker never unpickles)")
        if func != self.function:
            return TakenJob(job_id, job, error=f"refused: this worker runs only {self.function}, not {func!r}")
        if not (isinstance(args, (list, tuple)) and len(args) == 1 and isinstance(args[0], bytes)):
            return TakenJob(job_id, job, error="job arguments must be one msgpack-encoded request")
        if len(args[0]) > self.max_payload_bytes:
            return TakenJob(job_id, job, error=f"payload is {len(args[0])} bytes, over max_payload_bytes "
                                                 f"{self.max_payload_bytes}")
        try:
            request = self.parse_request(args[0]).validate()
        except BrokerError as e:
            return TakenJob(job_id, job, error=f"{type(e).__name__}: {e}")
        if request.deadline and request.deadline < time.time():
            return TakenJob(job_id, job, error="client deadline passed before the job started: not computed")
        return TakenJob(job_id, job, request=request)

    # -- recording -----------------------------------------------------------------------------------
    def mark_started(self, jobs: list[TakenJob], heartbeat_ttl: int, pipeline=None) -> None:
        """Started registry entries (scored by a heartbeat deadline), then off the intermediate list (RQ's
        order). From here on a job whose worker dies is found by broker.recovery."""
        pipe = pipeline if pipeline is not None else self.connection.pipeline(transaction=False)
        for t in jobs:
            t.job.prepare_for_execution(self.worker_name, pipe)
            t.execution = Execution.create(t.job, heartbeat_ttl, pipe, worker_name=self.worker_name)
        for t in jobs:
            pipe.lrem(self.intermediate_key, 1, t.job_id)
        if pipeline is None:
            pipe.execute()

    def refresh(self, jobs: list[TakenJob], heartbeat_ttl: int, pipe) -> None:
        """Pushes the heartbeat deadline of jobs this worker still holds."""
        deadline = time.time() + heartbeat_ttl
        entries = {t.execution.composite_key: deadline for t in jobs if t.execution is not None}
        if entries:
            pipe.zadd(self.started.key, entries, xx=True)
            for t in jobs:
                if t.execution is not None:
                    pipe.expire(t.execution.key, heartbeat_ttl + 60)

    def write_meta(self, t: TakenJob, updates: dict, pipeline=None) -> None:
        """Merges `updates` into the job's RQ meta and writes it (one HSET of the msgpack'd `meta` field)."""
        t.job.meta.update(updates)
        (pipeline if pipeline is not None else self.connection).hset(
            t.job.key, "meta", MsgpackSerializer.dumps(t.job.meta))

    def record(self, done: list[tuple[TakenJob, bytes]], failed: list[tuple[TakenJob, str]], result_ttl: int,
               pipeline=None) -> None:
        """Finished and failed jobs of a batch (plus whatever the caller already queued on `pipeline`)."""
        pipe = pipeline if pipeline is not None else self.connection.pipeline(transaction=False)
        ended = now()
        for t, handle_bytes in done:
            pipe.hset(t.job.key, mapping={"status": JobStatus.FINISHED.value, "ended_at": utcformat(ended)})
            Result(t.job_id, Result.Type.SUCCESSFUL, self.connection, return_value=handle_bytes,
                   worker_name=self.worker_name, serializer=MsgpackSerializer,
                   execution_id=t.execution.id if t.execution else None).save(result_ttl, pipe)
            self.finished.add(t.job, result_ttl, pipe)
            pipe.expire(t.job.key, result_ttl)
            if t.execution is not None:
                t.execution.delete(t.job, pipe)
        for t, reason in failed:
            self._record_failure(pipe, t, reason, result_ttl, ended)
        for t, _ in failed:
            if t.execution is None:  # failed before it started: still on the intermediate list
                pipe.lrem(self.intermediate_key, 1, t.job_id)
        pipe.execute()

    def _record_failure(self, pipe, t: TakenJob, reason: str, ttl: int, ended) -> None:
        key = Job.key_for(t.job_id)
        pipe.hset(key, mapping={"status": JobStatus.FAILED.value, "ended_at": utcformat(ended),
                                "exc_info": zlib.compress(reason.encode())})
        pipe.expire(key, ttl)
        pipe.zadd(self.failed.key, {t.job_id: time.time() + ttl})
        Result(t.job_id, Result.Type.FAILED, self.connection, exc_string=reason, worker_name=self.worker_name,
               serializer=MsgpackSerializer).save(ttl, pipe)
        if t.execution is not None:
            t.execution.delete(t.job, pipe)

    def requeue_abandoned(self) -> list[int]:
        """Jobs whose worker stopped heart-beating are retried or failed (broker.recovery); [requeued, failed]."""
        keys, argv = recover_args(self.queue)
        return self._recover(keys=keys, args=argv)
