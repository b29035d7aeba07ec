"""The encoder worker: jobs from many clients in token-budget batches, the device kept busy.

Three stages overlap, each in its own thread, with a queue between them (TEI's shape), one module each under
workers/stages/, which also holds what they hand each other (types.py) and all they share (links.py): intake
takes jobs, checks and tokenizes them and forms the next batch while the device runs the current one; compute
(the main thread) runs the encoder; delivery writes results, rings clients on this host and records the batch in
Redis. This module wires them, and runs the housekeeping thread: it heartbeats the worker and the jobs it holds,
recovers dead workers' jobs and sweeps segments. docs/ARCHITECTURE.md draws the threads and a job's way.
"""

from __future__ import annotations

import logging
import threading

from broker.protocol.host import host_id
from shm import sweep
from workers.config import EncoderWorkerConfig
from workers.devices import describe as describe_device
from workers.encoding_cache import EncodingCache
from workers.images import ImageLimits
from workers.job_source import TakenJob
from workers.pixel_budget import PixelBudget
from workers.result_writer import ResultWriter
from workers.serve_loop import CONNECTION_ERRORS, ServeLoop
from workers.stages.compute import Compute
from workers.stages.delivery import Delivery
from workers.stages.intake import Intake
from workers.stages.links import Links
from workers.stats import Tally, record_in

log = logging.getLogger("workers")


class EncoderWorker(ServeLoop):
    def __init__(self, config: EncoderWorkerConfig, encoder):
        super().__init__(config.redis_url, config.queue, config.max_payload_bytes)
        self.config = config
        self.encoder = encoder
        self.device = describe_device(str(encoder.device))
        self.dtype = str(encoder.dtype).replace("torch.", "")
        self.quantization = getattr(encoder, "quantization", None) or ""
        encoder.configure_images(ImageLimits(config.max_images_per_job, config.max_image_pixels,
                                             config.max_image_side), config.image_cache_max_bytes)
        self.maintenance_interval_s = config.housekeeping_interval_s
        self.heartbeat_ttl_s = config.job_heartbeat_ttl_s
        self.links = Links(stopping=self.stopping, pixels=PixelBudget(config.max_image_pixels_in_flight),
                           cache=EncodingCache(config.cache_max_bytes))
        self._held: dict[str, TakenJob] = {}  # the housekeeping thread's own, from links.held
        writer = ResultWriter(host_id(), config.result_ttl_s, self.name, config.shm_prefix, config.shm_max_bytes)
        self.writer = writer  # its results by transport, for workers.metrics
        self.tally = Tally()
        self.source.observe = lambda update: record_in(self.tally, update)
        self.intake = Intake(self.source, encoder.tokenize, encoder.images, config, self.links, self.outage)
        self.compute = Compute(encoder, config.max_batch_tokens, self.links)
        self.delivery = Delivery(self.source, writer, config.result_ttl_s, self.links)

    def describe(self) -> str:
        return (f"queue {self.queue!r} with the {self.encoder.backend} encoder on {self.encoder.device}, "
                f"{self.dtype}, {self.quantization or 'not quantized'}")

    def run(self) -> None:
        self.install_signal_handlers()
        log.info("worker %s serving %s", self.name, self.describe())
        self.keep_alive()  # publishes the queue bound before a client can see the worker
        stages = [threading.Thread(target=self.intake.run, name="intake", daemon=True),
                  threading.Thread(target=self.delivery.run, name="delivery", daemon=True)]
        housekeeping = threading.Thread(target=self._housekeeping_loop, name="housekeeping", daemon=True)
        for t in (*stages, housekeeping):
            t.start()
        self.compute.run()
        for t in stages:
            t.join()
        self.links.finished.set()
        housekeeping.join()
        self.unregister()

    def maintain(self) -> None:
        removed = sweep(self.config.shm_prefix, grace_s=min(self.config.result_ttl_s, 10))
        if removed:
            log.info("swept %d expired or orphaned segment(s)", len(removed))

    def keep_alive(self) -> bool:
        """One round of housekeeping: registration, the heartbeat of the worker and of every job it holds, the
        queue's bound for clients' admission (broker.protocol.enqueue), recovery and sweeps. False when Redis is
        down."""
        while not self.links.held.empty():
            change, jobs = self.links.held.get_nowait()
            for t in jobs:
                if change == "hold":
                    self._held[t.job_id] = t
                else:
                    self._held.pop(t.job_id, None)
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                if self.config.max_queue_depth > 0:  # lapses when no worker is left to refresh it
                    pipe.set(self.source.keys.bound, self.config.max_queue_depth,
                             ex=max(10, int(self.maintenance_interval_s * 3)))
                self.source.refresh(list(self._held.values()), self.heartbeat_ttl_s, pipe)
                self.heartbeat(pipe)
                pipe.execute()
            self.housekeeping()
            self.outage.answered()
            return True
        except CONNECTION_ERRORS as e:
            self.outage.failed(e, "heart-beating")
            self._registered = False
            self._last_maintenance = 0.0
        except Exception:
            log.exception("housekeeping failed; retrying")
        return False

    def _housekeeping_loop(self) -> None:
        interval = max(0.2, min(1.0, self.heartbeat_ttl_s / 4))
        while not self.links.finished.wait(interval):
            self.keep_alive()
