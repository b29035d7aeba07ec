"""The part every queue-serving process shares: RQ worker registration and heartbeat, abandoned-job recovery,
signal handling and riding out Redis restarts. `run()` is the simple one-batch-at-a-time loop (DiT workers);
the encoder worker overlaps its stages in threads and reuses the pieces."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import redis
from rq import Queue, SimpleWorker, worker_registration

from broker.protocol.connections import connect
from broker.protocol.serializer import MsgpackSerializer
from workers.job_source import CONNECTION_ERRORS, JobSource, TakenJob
from workers.outage import Backoff, RedisOutage

log = logging.getLogger("workers")

HEARTBEAT_TTL_S = 30  # default: a job whose worker is silent this long is retried or failed


class ServeLoop:
    maintenance_interval_s = 5.0
    heartbeat_ttl_s = HEARTBEAT_TTL_S
    device = ""  # the device the worker holds (workers.devices.describe), in its RQ record for `broker stats`
    dtype = ""  # what it computes in ("bfloat16"), in that record too
    quantization = ""  # its weights' quantization ("" while none: no backend quantizes yet), in that record too
    tally = None  # an encoder worker's workers.stats.Tally, whose counters go into its RQ record

    def __init__(self, redis_url: str, queue: str, max_payload_bytes: int, **source_kw):
        self.connection = connect(redis_url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
        rq_queue = Queue(queue, connection=self.connection, serializer=MsgpackSerializer)
        # RQ's worker record only (registration, heartbeat, state) so rq-dashboard and `rq info` see us;
        # RQ's own fork-per-job loop is not used. Nothing is sent to Redis before `run` (prepare_for_work would
        # name the connection): a Redis that is not up yet, or that wants a password, is told and waited for there.
        self.rq_worker = SimpleWorker([rq_queue], connection=self.connection, serializer=MsgpackSerializer,
                                      prepare_for_work=False)
        self.rq_worker.hostname, self.rq_worker.pid = socket.gethostname(), os.getpid()
        self.name = self.rq_worker.name
        self.queue = queue
        self.source = JobSource(self.connection, queue, self.name, max_payload_bytes, **source_kw)
        self.stopping = threading.Event()
        self.outage = RedisOutage(redis_url, self.stopping)
        self._registered = False
        self._last_maintenance = 0.0

    def request_stop(self, *_):
        if not self.stopping.is_set():
            log.info("worker %s: stopping after the jobs it holds", self.name)
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def batch_size(self) -> int:
        return 1

    def handle(self, jobs: list[TakenJob]) -> None:
        raise NotImplementedError

    def maintain(self) -> None:
        """Extra periodic work of a subclass (runs with the heartbeat)."""

    def describe(self) -> str:
        return f"queue {self.queue!r}"

    def ensure_registered(self) -> None:
        """Announces the worker, and again once Redis answers after an outage; in between, each heartbeat
        writes back whatever of the record Redis dropped."""
        if self._registered:
            return
        self.connection.delete(self.rq_worker.key)  # a heartbeat may have left a partial record behind
        try:
            self.rq_worker.ip_address = str(self.connection.client_info()["addr"])  # as RQ's own worker shows it
        except redis.ResponseError:  # CLIENT INFO refused (an older or managed Redis)
            pass
        self.rq_worker.register_birth()
        self.rq_worker.set_state("idle")
        shown = {k: v for k, v in (("device", self.device), ("dtype", self.dtype),
                                   ("quantization", self.quantization)) if v}
        if shown:
            self.connection.hset(self.rq_worker.key, mapping=shown)
        self._registered = True

    def heartbeat(self, pipe=None) -> None:
        """RQ's heartbeat, on `pipe` if given, with the worker's registration written again: its record's fields
        (those `broker stats`, /health and rq-dashboard read) and its place in rq:workers and rq:workers:<queue>.
        A DEL, an eviction (allkeys-lru) or a restart that drops any of them is undone by the next heartbeat."""
        w = self.rq_worker
        conn = pipe if pipe is not None else self.connection
        w.heartbeat(self.heartbeat_ttl_s + 60, pipeline=conn)  # last_heartbeat, and the record's expiry
        if w.birth_date is not None:  # registered once (ensure_registered): restore, never announce early
            conn.hset(w.key, mapping={**w.serialize(), "state": w.get_state(),
                                      **({"device": self.device} if self.device else {})})
            worker_registration.register(w, conn)
        if self.tally is not None:
            # RQ's own worker counters, which `rq info` and rq-dashboard show: our jobs are recorded by scripts,
            # not by RQ's Worker, so they are set here from the worker's tally (at most a heartbeat behind).
            counters, _ = self.tally.snapshot()
            conn.hset(w.key, mapping={
                "successful_job_count": counters.get("jobs_ok", 0), "failed_job_count": counters.get("failed", 0),
                "total_working_time": counters.get("infer_ms", 0) / 1e3})

    def housekeeping(self) -> None:
        """Registration, heartbeat, recovery of abandoned jobs and the subclass's `maintain`, at most every
        maintenance_interval_s."""
        self.ensure_registered()
        t = time.time()
        if t - self._last_maintenance < self.maintenance_interval_s:
            return
        self.heartbeat()
        requeued, failed = self.source.requeue_abandoned()
        if requeued or failed:
            log.warning("abandoned jobs of a dead worker: %d requeued, %d failed", requeued, failed)
        self.maintain()
        self._last_maintenance = t

    def unregister(self) -> None:
        try:
            self.rq_worker.register_death()
        except redis.RedisError:
            pass
        log.info("worker %s stopped", self.name)

    def run(self) -> None:
        self.install_signal_handlers()
        log.info("worker %s serving %s", self.name, self.describe())
        backoff = Backoff(self.outage, "serving jobs")
        while not self.stopping.is_set():
            try:
                self.housekeeping()
                taken = self.source.wait_and_take(self.batch_size(), self.heartbeat_ttl_s, 1.0)
                backoff.answered()
                if not taken:
                    continue
                self.rq_worker.set_state("busy")
                self.handle(taken)
                self.rq_worker.set_state("idle")
            except CONNECTION_ERRORS as e:
                backoff.failed(e)
                self._registered = False
                self._last_maintenance = 0.0
        self.unregister()
