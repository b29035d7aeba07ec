"""The part every queue-serving process shares: RQ worker registration, heartbeat, abandoned-job cleanup,
the segment sweep, signal handling and riding out Redis restarts. Subclasses handle the batches."""

from __future__ import annotations

import logging
import signal
import time

import redis
from rq import Queue, SimpleWorker

from broker.serializer import MsgpackSerializer
from workers.job_source import JobSource, TakenJob

log = logging.getLogger("workers")

HEARTBEAT_TTL_S = 30  # a worker silent for this long is presumed dead; its jobs are retried or failed


class ServeLoop:
    maintenance_interval_s = 5.0

    def __init__(self, redis_url: str, queue: str, max_payload_bytes: int, **source_kw):
        self.connection = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=30,
                                               health_check_interval=30)
        rq_queue = Queue(queue, connection=self.connection, serializer=MsgpackSerializer)
        # RQ's worker record only (registration, heartbeat, state) so rq-dashboard and `rq info` see us;
        # RQ's own fork-per-job loop is not used.
        self.rq_worker = SimpleWorker([rq_queue], connection=self.connection, serializer=MsgpackSerializer)
        self.name = self.rq_worker.name
        self.queue = queue
        self.source = JobSource(self.connection, queue, self.name, max_payload_bytes, **source_kw)
        self._stop = False
        self._registered = False
        self._last_maintenance = 0.0

    def request_stop(self, *_):
        self._stop = True

    def batch_size(self) -> int:
        return 1

    def handle(self, jobs: list[TakenJob]) -> None:
        raise NotImplementedError

    def maintain(self) -> None:
        """Extra periodic work of a subclass (runs with the heartbeat)."""

    def describe(self) -> str:
        return f"queue {self.queue!r}"

    def run(self, max_batches: int | None = None) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        log.info("worker %s serving %s", self.name, self.describe())
        batches, backoff = 0, 0.5
        while not self._stop and (max_batches is None or batches < max_batches):
            try:
                self._maintain()
                first = self.source.wait_first(1.0)
                if first is None:
                    continue
                self.rq_worker.set_state("busy")
                self.handle(self.source.take(first, self.batch_size() - 1))
                self.rq_worker.set_state("idle")
                batches += 1
                backoff = 0.5
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.error("Redis unreachable (%s); retrying in %.1fs", e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                self._registered = False
                self._last_maintenance = 0.0
        try:
            self.rq_worker.register_death()
        except redis.RedisError:
            pass
        log.info("worker %s stopped", self.name)

    def _maintain(self) -> None:
        t = time.time()
        if t - self._last_maintenance < self.maintenance_interval_s:
            return
        if not self._registered:  # first run, or Redis came back (maybe empty): announce ourselves again
            self.rq_worker.register_birth()
            self.rq_worker.set_state("idle")
            self._registered = True
        self.rq_worker.heartbeat(HEARTBEAT_TTL_S + 60)
        self.source.requeue_abandoned()
        self.maintain()
        self._last_maintenance = t
