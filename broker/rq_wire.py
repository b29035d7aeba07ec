"""Submitting one job and waiting for its result over Redis, sync and asyncio, with one deadline for both.

Jobs are RQ-compatible records (broker.protocol.enqueue); results are read from RQ's result stream with a blocking
XREAD, so a waiting client costs Redis nothing and hears of the result at once. A sync client with a doorbell
(broker.protocol.doorbell) waits on it and on the XREAD together. Connection errors are retried on a fresh
connection until the deadline (unless `retries` is 0): a client rides out a Redis restart shorter than its timeout.

A Redis that lost the job (restarted without its data, or failed over to a replica that never had it) would leave
its client waiting until the timeout: so the client keeps what it sent until the result comes, looks whether
Redis still knows the job after every reconnection and at every recovery check, and if not enqueues the same
request again under the same id (a result of the first run, if one still comes, answers it as well). Results are
deterministic; a worker records only the first result of a job (broker/protocol/lua/record.lua) and drops the others.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import redis
import redis.asyncio as aredis

from broker.errors import BrokerTimeout, BrokerUnavailable, Overloaded
from broker.loop_clients import LoopClients
from broker.protocol import keys
from broker.protocol.connections import CONNECTION_ERRORS, DeferredReplies, connect, redacted, unreachable
from broker.protocol.doorbell import Doorbell, wait_either
from broker.protocol.enqueue import new_job_mapping
from broker.protocol.scripts import Scripts, enqueue_args, recover_args
from broker.results import JobOutcome, parse_result_entry, result_fields

RESULT_TTL_S = 60  # how long a result waits in Redis for a client that is slow to read it
# While waiting, a client looks this often whether its job's worker died (RECOVER: broker/protocol/lua/recover.lua):
# with no other worker alive to notice, the job is still retried or failed, not left hanging until the timeout.
RECOVERY_CHECK_S = 2.0
RETRY_MAX_DELAY_S = 1.0

log = logging.getLogger("broker")


class Retrying:
    """One call's connection retries: 50 ms apart, doubling up to RETRY_MAX_DELAY_S, none past `deadline`;
    none at all with retries=0. A count would give up during a Redis restart that the call's timeout covers."""

    def __init__(self, wire: "JobWire", deadline: float):
        self.wire, self.deadline, self.delay = wire, deadline, 0.05

    def next_delay(self, err: Exception) -> float:
        """How long to wait before the next attempt; BrokerUnavailable when there is none."""
        if self.wire.retries <= 0 or time.time() + self.delay >= self.deadline:
            raise self.wire.unavailable(err) from None
        delay, self.delay = self.delay, min(2 * self.delay, RETRY_MAX_DELAY_S)
        return delay


@dataclass(slots=True)
class Sent:
    """A request a client enqueued and waits for: what it takes to enqueue it again."""

    payload: bytes
    deadline: float
    description: str


@dataclass(frozen=True, slots=True)
class QueueState:
    """What a queue's Redis says of it: jobs waiting, live workers serving it, and which Redis answered (its
    run_id, None where INFO is refused: another run_id means Redis restarted or another server took its place)."""

    depth: int
    live_workers: int
    redis_run_id: str | None


class JobWire:
    """One queue's submit-and-wait, shared by EncoderClient and GenerationClient, and what Redis says of the
    queue (QueueState). The sync and asyncio methods differ only in how they wait: what they send and how they
    read it is shared."""

    def __init__(self, redis_url: str, queue: str, function: str, timeout: float, retries: int,
                 max_queue_depth: int = 0):
        self.redis_url = redis_url
        self.queue = queue
        self.function = function
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.max_queue_depth = int(max_queue_depth)
        self._keys = keys.QueueKeys(queue)
        # Reads block up to the whole timeout (XREAD BLOCK), so the socket may wait a little longer than that.
        self._kw = dict(socket_connect_timeout=min(self.timeout, 5.0), socket_timeout=self.timeout + 1.0,
                        health_check_interval=0)
        self.redis = connect(redis_url, **self._kw)
        self.scripts = Scripts(self.redis)
        self._replies = DeferredReplies(self.redis)  # the XREADs raced against a doorbell
        self._async = LoopClients(self._new_aclient)
        self._sent: dict[str, Sent] = {}  # job id -> its request, in the order sent, until its result comes
        self._sent_lock = threading.Lock()

    def deadline(self) -> float:
        return time.time() + self.timeout

    def _job(self, sent: Sent, job_id: str | None = None) -> tuple[str, list, list]:
        """(job id, ENQUEUE's KEYS and ARGV) of request `sent`; with `job_id`, that job enqueued again (see
        _again)."""
        remaining = max(1, int(sent.deadline - time.time()) + 1)
        again = job_id is not None
        job_id, mapping = new_job_mapping(
            sent.payload, self.queue, function=self.function, job_timeout=remaining + 5, result_ttl=RESULT_TTL_S,
            failure_ttl=RESULT_TTL_S, ttl=remaining, retries=self.retries, description=sent.description,
            job_id=job_id)
        return job_id, *enqueue_args(job_id, mapping, self.queue, self.max_queue_depth, remaining, again=again)

    def _admitted(self, job_id: str, pushed: int, sent: Sent) -> str:
        if pushed < 0:
            raise Overloaded(f"queue {self.queue!r} is full ({-pushed - 1} jobs waiting, its max_queue_depth): "
                             "retry later or add workers")
        with self._sent_lock:
            now = time.time()
            while self._sent:  # requests whose deadline passed: their callers gave up (the oldest come first)
                oldest = next(iter(self._sent))
                if self._sent[oldest].deadline >= now:
                    break
                del self._sent[oldest]
            self._sent[job_id] = sent
        return job_id

    def _answered(self, job_id: str) -> None:
        with self._sent_lock:
            self._sent.pop(job_id, None)

    def _again(self, job_id: str, recovered: list) -> tuple[list, list] | None:
        """ENQUEUE's KEYS and ARGV for `job_id` when RECOVER's reply says Redis lost it and this wire sent it."""
        sent = self._sent.get(job_id)
        if recovered[2] or sent is None:
            return None
        return self._job(sent, job_id)[1:]

    def _enqueued_again(self, job_id: str, pushed: int) -> None:
        if pushed > 0:
            log.warning("job %s is gone from Redis at %s (restarted without its data, or failed over): enqueued "
                        "again on queue %r", job_id, redacted(self.redis_url), self.queue)

    def _xread_args(self, job_id: str, deadline: float) -> tuple:
        """XREAD of the job's result stream, blocking until the deadline or the next recovery check."""
        block_ms = int(min(deadline - time.time(), RECOVERY_CHECK_S) * 1000)
        if block_ms <= 0:
            raise BrokerTimeout(f"no result for job {job_id} on queue {self.queue!r} within {self.timeout:.1f}s")
        return "XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS", keys.results(job_id), "0-0"

    def unavailable(self, err: Exception) -> BrokerUnavailable:
        return BrokerUnavailable(unreachable(self.redis_url, err))

    # -- sync ------------------------------------------------------------------------------------------
    def submit(self, payload: bytes, deadline: float, description: str = "") -> str:
        """Enqueues the job; its id."""
        sent = Sent(payload, deadline, description)
        job_id, keys_, argv = self._job(sent)
        retrying = Retrying(self, deadline)
        while True:
            try:
                return self._admitted(job_id, self.scripts.call("enqueue", keys_, argv), sent)
            except CONNECTION_ERRORS as e:
                time.sleep(retrying.next_delay(e))

    def wait(self, job_id: str, deadline: float, bell: Doorbell | None = None, stale=None) -> JobOutcome:
        """The job's outcome from its result stream, or from `bell` if a worker rings it first (its value is
        then the handle). `stale` gets the handles of rings for other jobs."""
        retrying = Retrying(self, deadline)
        check = False  # whether to recover the job (and see that Redis still has it) before waiting again
        while True:
            try:
                if check:
                    self._check(job_id)
                    check = False
                outcome = self._wait_once(job_id, deadline, bell, stale or (lambda handle: None))
                if outcome is not None:
                    self._answered(job_id)
                    return outcome
                check = True
            except CONNECTION_ERRORS as e:
                check = True  # at once when Redis is back: it may have come back without the job
                time.sleep(retrying.next_delay(e))

    def _check(self, job_id: str) -> None:
        again = self._again(job_id, self.scripts.call("recover", *recover_args(self.queue, job_id)))
        if again is not None:
            self._enqueued_again(job_id, self.scripts.call("enqueue", *again))

    def _wait_once(self, job_id: str, deadline: float, bell: Doorbell | None, stale) -> JobOutcome | None:
        """The outcome, or None when nothing came before the next recovery check."""
        xread = self._xread_args(job_id, deadline)
        if bell is None:
            got = self.redis.execute_command(*xread)
        else:
            self._replies.send(xread)
            via, got = wait_either(bell, job_id, self._replies, xread[4] / 1e3 + 1.0, stale)
            if via == "doorbell":
                return JobOutcome(got, None, via="doorbell")
            if via == "timeout":
                raise redis.TimeoutError("no reply to a blocking XREAD in time")
        return parse_result_entry(result_fields(got)) if got else None

    def getdel(self, key: str) -> bytes | None:
        try:
            return self.redis.getdel(key)
        except CONNECTION_ERRORS as e:
            raise self.unavailable(e) from None

    # -- asyncio ---------------------------------------------------------------------------------------
    def _new_aclient(self) -> tuple[aredis.Redis, Scripts]:
        client = connect(self.redis_url, asyncio=True, **self._kw)
        return client, Scripts(client)

    def _aclient(self) -> tuple[aredis.Redis, Scripts]:
        """The asyncio client of the running event loop (broker.loop_clients: a client may be used across
        asyncio.run() calls, each its own loop, and keeps connections for open loops only)."""
        return self._async.get()

    async def asubmit(self, payload: bytes, deadline: float, description: str = "") -> str:
        sent = Sent(payload, deadline, description)
        job_id, keys_, argv = self._job(sent)
        retrying = Retrying(self, deadline)
        while True:
            try:
                return self._admitted(job_id, await self._aclient()[1].call("enqueue", keys_, argv), sent)
            except CONNECTION_ERRORS as e:
                await asyncio.sleep(retrying.next_delay(e))

    async def await_result(self, job_id: str, deadline: float) -> JobOutcome:
        retrying = Retrying(self, deadline)
        check = False  # as in `wait`
        while True:
            try:
                client, scripts = self._aclient()
                if check:
                    again = self._again(job_id, await scripts.call("recover", *recover_args(self.queue, job_id)))
                    if again is not None:
                        self._enqueued_again(job_id, await scripts.call("enqueue", *again))
                    check = False
                got = await client.execute_command(*self._xread_args(job_id, deadline))
                if got:
                    self._answered(job_id)
                    return parse_result_entry(result_fields(got))
                check = True
            except CONNECTION_ERRORS as e:
                check = True
                await asyncio.sleep(retrying.next_delay(e))

    async def agetdel(self, key: str) -> bytes | None:
        try:
            return await self._aclient()[0].getdel(key)
        except CONNECTION_ERRORS as e:
            raise self.unavailable(e) from None

    async def aqueue_depth(self) -> int:
        """How many jobs wait in the queue."""
        return await self._aclient()[0].llen(self._keys.queue)

    async def aqueue_state(self, worker_stale_s: float) -> QueueState:
        """The queue's depth, its live workers (RQ's registry of the queue's workers, each counted while its RQ
        heartbeat is younger than `worker_stale_s`) and the Redis server's run_id, in two round trips."""
        from rq.utils import utcparse  # rq's import is heavy; only this reads RQ's worker records

        async with self._aclient()[0].pipeline(transaction=False) as pipe:
            pipe.llen(self._keys.queue)
            pipe.smembers(self._keys.workers)
            pipe.info("server")  # its run_id; a Redis that refuses INFO (renamed away) just goes without
            depth, members, server = await pipe.execute(raise_on_error=False)
        for reply in (depth, members):
            if isinstance(reply, Exception):
                raise reply
        async with self._aclient()[0].pipeline(transaction=False) as pipe:
            for key in members:
                pipe.hget(key, "last_heartbeat")
            beats = await pipe.execute()
        now = time.time()
        live = sum(1 for b in beats if b and now - utcparse(b.decode()).timestamp() < worker_stale_s)
        return QueueState(depth, live, server.get("run_id") if isinstance(server, dict) else None)

    def close(self) -> None:
        self._replies.discard()
        self.redis.close()

    async def aclose(self) -> None:
        await self._async.close()
