"""Submitting one job and waiting for its result over Redis, sync and asyncio, with one deadline for both.

Jobs are RQ-compatible records (see broker.enqueue); results are read from RQ's result stream with a
blocking XREAD, so a waiting client costs Redis nothing and hears of the result at once. A sync client with a
doorbell (broker.doorbell) waits on it and on the XREAD together, and takes whichever answers first.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import Callable

import redis
import redis.asyncio as aredis

from broker.connections import connect, discard_connection, unreachable
from broker.doorbell import Doorbell
from broker.enqueue import ENQUEUE_SCRIPT, enqueue_args, new_job_id, new_job_mapping
from broker.errors import BrokerTimeout, BrokerUnavailable, Overloaded
from broker.recovery import RECOVER_SCRIPT, recover_args
from broker.results import JobOutcome, parse_result_entry, result_fields

RESULT_KEY = "rq:results:{}"
RESULT_TTL_S = 60  # how long a result waits in Redis for a client that is slow to read it
# While waiting, a client looks this often whether its job's worker died (see broker.recovery): with no other
# worker alive to notice, the job is still retried or failed, not left hanging until the timeout.
RECOVERY_CHECK_S = 2.0
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)


class JobWire:
    """One queue's submit-and-wait, shared by EncoderClient and GenerationClient."""

    def __init__(self, redis_url: str, queue: str, function: str, timeout: float, retries: int,
                 max_queue_depth: int = 0):
        self.redis_url = redis_url
        self.queue = queue
        self.function = function
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.max_queue_depth = int(max_queue_depth)
        # Reads block up to the whole timeout (XREAD BLOCK), so the socket may wait a little longer than that.
        self._kw = dict(socket_connect_timeout=min(self.timeout, 5.0), socket_timeout=self.timeout + 1.0,
                        health_check_interval=0)
        self.redis = connect(redis_url, **self._kw)
        self._enqueue = self.redis.register_script(ENQUEUE_SCRIPT)
        self._recover = self.redis.register_script(RECOVER_SCRIPT)
        self._aredis: aredis.Redis | None = None
        self._aenqueue = self._arecover = None
        # A connection of its own for XREADs raced against a doorbell: when the doorbell wins, its XREAD's
        # reply is still to come (the worker records the result just after ringing) and is read before reuse.
        self._race_conn = None
        self._race_pending = False
        self.last_queue_length = 0  # the queue's length just after this client's last job joined it

    @property
    def aredis(self) -> aredis.Redis:
        if self._aredis is None:
            self._aredis = connect(self.redis_url, asyncio=True, **self._kw)
            self._aenqueue = self._aredis.register_script(ENQUEUE_SCRIPT)
            self._arecover = self._aredis.register_script(RECOVER_SCRIPT)
        return self._aredis

    def deadline(self) -> float:
        return time.time() + self.timeout

    def _job(self, payload: bytes, deadline: float, description: str, job_id: str | None = None,
             wake: bool = True) -> tuple[str, list, list]:
        remaining = max(1, int(deadline - time.time()) + 1)
        job_id, mapping = new_job_mapping(
            payload, self.queue, function=self.function, job_timeout=remaining + 5, result_ttl=RESULT_TTL_S,
            failure_ttl=RESULT_TTL_S, ttl=remaining, retries=self.retries, description=description, job_id=job_id,
        )
        keys, argv = enqueue_args(job_id, mapping, self.queue, self.max_queue_depth, remaining, wake)
        return job_id, keys, argv

    def _admitted(self, pushed: int) -> None:
        if pushed < 0:
            raise Overloaded(f"queue {self.queue!r} is full ({-pushed - 1} jobs waiting, its max_queue_depth): "
                             "retry later or add workers")

    def _block_ms(self, job_id: str, deadline: float) -> int:
        block_ms = int(min(deadline - time.time(), RECOVERY_CHECK_S) * 1000)
        if block_ms <= 0:
            raise self._timed_out(job_id)
        return block_ms

    def unavailable(self, err: Exception) -> BrokerUnavailable:
        return BrokerUnavailable(unreachable(self.redis_url, err))

    def _timed_out(self, job_id: str) -> BrokerTimeout:
        return BrokerTimeout(f"no result for job {job_id} on queue {self.queue!r} within {self.timeout:.1f}s")

    # -- sync ------------------------------------------------------------------------------------------
    def submit(self, payload: bytes, deadline: float, description: str = "",
               ring: Callable[[str], int] | None = None) -> str:
        """Enqueues the job; its id. `ring(job_id)` first rings a worker's doorbell with it (broker.doorbell) and
        returns how many it reached: a job rung wakes no worker through Redis, since the worker rung claims it
        from the queue itself (it runs the job meanwhile: the ring goes out before the enqueue is even built)."""
        job_id = new_job_id()
        wake = ring is None or not ring(job_id)
        job_id, keys, argv = self._job(payload, deadline, description, job_id, wake)
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                pushed = self._enqueue(keys=keys, args=argv)
                self.last_queue_length = pushed
                self._admitted(pushed)
                return job_id
            except CONNECTION_ERRORS as e:
                if attempt == self.retries or time.time() + delay >= deadline:
                    raise self.unavailable(e) from None
                time.sleep(delay)
                delay *= 2

    def wait(self, job_id: str, deadline: float, bell: Doorbell | None = None,
             stale: Callable[[bytes], None] | None = None) -> JobOutcome:
        """The job's outcome from its result stream, or from `bell` if a worker rings it first (its value is
        then the handle). `stale` gets the handles of rings for other jobs."""
        if bell is not None:
            return self._wait_either(job_id, deadline, bell, stale or (lambda handle: None))
        key = RESULT_KEY.format(job_id)
        while True:
            block_ms = self._block_ms(job_id, deadline)
            try:
                got = self.redis.xread({key: "0-0"}, count=1, block=block_ms)
                if not got:
                    keys, argv = recover_args(self.queue, job_id)
                    self._recover(keys=keys, args=argv)
            except CONNECTION_ERRORS as e:
                raise self.unavailable(e) from None
            if got:
                return parse_result_entry(got[0][1][0][1])

    def _wait_either(self, job_id: str, deadline: float, bell: Doorbell, stale) -> JobOutcome:
        key = RESULT_KEY.format(job_id)
        try:
            conn = self._race_connection()
            while True:
                if not self._race_pending:
                    conn.send_command("XREAD", "COUNT", 1, "BLOCK", self._block_ms(job_id, deadline),
                                      "STREAMS", key, "0-0")
                    self._race_pending = True
                # poll, not select: a process with over 1024 descriptors open can't select on them
                poller = select.poll()
                poller.register(bell.fileno(), select.POLLIN)
                poller.register(conn._sock.fileno(), select.POLLIN)
                ready = {fd for fd, _ in poller.poll((max(0.0, deadline - time.time()) + 1.0) * 1e3)}
                readable = [x for x in (bell, conn._sock) if x.fileno() in ready]
                if bell in readable or not readable:
                    handle, others = bell.take(job_id)
                    for h in others:
                        stale(h)
                    if handle is not None:
                        return JobOutcome(handle, None, via="doorbell")
                if conn._sock in readable:
                    got = conn.read_response()
                    self._race_pending = False
                    if got:
                        return parse_result_entry(result_fields(got))
                    keys, argv = recover_args(self.queue, job_id)
                    self._recover(keys=keys, args=argv)
                elif not readable:
                    raise self._timed_out(job_id)
        except CONNECTION_ERRORS as e:
            self._drop_race_connection()
            raise self.unavailable(e) from None

    def _race_connection(self):
        """The racing XREADs' connection, with no reply outstanding: a reply still on its way after a doorbell
        won is read if it has come, else the connection is replaced (its XREAD may block for seconds)."""
        if self._race_conn is None:
            self._race_conn = self.redis.connection_pool.get_connection()
        elif self._race_pending:
            if self._race_conn.can_read(timeout=0):
                self._race_conn.read_response()
                self._race_pending = False
            else:
                self._drop_race_connection()
                self._race_conn = self.redis.connection_pool.get_connection()
        return self._race_conn

    def _drop_race_connection(self) -> None:
        discard_connection(self.redis.connection_pool, self._race_conn)
        self._race_conn = None
        self._race_pending = False

    def getdel(self, key: str) -> bytes | None:
        try:
            return self.redis.getdel(key)
        except CONNECTION_ERRORS as e:
            raise self.unavailable(e) from None

    # -- asyncio ---------------------------------------------------------------------------------------
    async def asubmit(self, payload: bytes, deadline: float, description: str = "") -> str:
        job_id, keys, argv = self._job(payload, deadline, description)
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                self.aredis  # creates the connection and its script on first use
                self._admitted(await self._aenqueue(keys=keys, args=argv))
                return job_id
            except CONNECTION_ERRORS as e:
                if attempt == self.retries or time.time() + delay >= deadline:
                    raise self.unavailable(e) from None
                await asyncio.sleep(delay)
                delay *= 2

    async def await_result(self, job_id: str, deadline: float) -> JobOutcome:
        key = RESULT_KEY.format(job_id)
        while True:
            block_ms = self._block_ms(job_id, deadline)
            try:
                got = await self.aredis.xread({key: "0-0"}, count=1, block=block_ms)
                if not got:
                    keys, argv = recover_args(self.queue, job_id)
                    await self._arecover(keys=keys, args=argv)
            except CONNECTION_ERRORS as e:
                raise self.unavailable(e) from None
            if got:
                return parse_result_entry(got[0][1][0][1])

    async def agetdel(self, key: str) -> bytes | None:
        try:
            return await self.aredis.getdel(key)
        except CONNECTION_ERRORS as e:
            raise self.unavailable(e) from None

    def close(self) -> None:
        self._drop_race_connection()
        self.redis.close()

    async def aclose(self) -> None:
        if self._aredis is not None:
            await self._aredis.aclose()
            self._aredis = self._aenqueue = None
