"""An encoder worker's Prometheus metrics at http://<host>:<metrics_port>/metrics, read at scrape time from the
figures the worker keeps anyway (workers.stats.Tally) and the queue's length in Redis.

    start_metrics(port, tally, connection, queue, writer=writer, pixels=budget)   # a daemon thread; port 0: nothing
"""

from __future__ import annotations

import logging

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from broker.protocol import keys
from workers.stats import Tally

log = logging.getLogger(__name__)

PREFIX = "encoder_broker_worker_"
HELP = {
    "batch_jobs": "jobs per batch",
    "batch_tokens": "prompt tokens per batch (after the template prefix)",
    "encode_seconds": "encoder time per batch",
    "job_latency_seconds": "a job's enqueue to its result handed out",
}
COUNTER_HELP = {
    "batches": "batches run",
    "tokens": "prompt tokens encoded (after the template prefix)",
    "computed_tokens": "tokens the encoder computed (the rest came from the cache)",
    "cache_hits": "prompts found in the encoding cache",
    "cache_misses": "prompts not found in the encoding cache",
    "expired_before_compute": "jobs failed uncomputed: their client's deadline passed before compute",
    "duplicate_results": "results dropped: an earlier run of their job (enqueued again by its client) answered it",
}
SKIPPED = {"jobs", "failed", "jobs_ok", "prompts", "failed_prompts", "infer_ms"}  # by outcome; infer_ms: encode_seconds


class WorkerCollector:
    def __init__(self, tally: Tally, connection: redis.Redis | None, queue: str, worker: str, writer=None,
                 pixels=None):
        """`writer`: the worker's workers.result_writer.ResultWriter (results by transport), if any; `pixels`: its
        workers.pixel_budget.PixelBudget, if any."""
        self.tally, self.connection, self.queue, self.worker, self.writer = tally, connection, queue, worker, writer
        self.pixels = pixels
        self.queue_key = keys.QueueKeys(queue).queue

    def collect(self):
        counters, histograms = self.tally.snapshot()
        jobs = CounterMetricFamily(PREFIX + "jobs", "jobs finished, by outcome", labels=["outcome"])
        jobs.add_metric(["ok"], counters.get("jobs_ok", 0))
        jobs.add_metric(["failed"], counters.get("failed", 0))
        yield jobs
        prompts = CounterMetricFamily(PREFIX + "prompts", "prompts of finished jobs, by the job's outcome",
                                      labels=["outcome"])
        prompts.add_metric(["ok"], counters.get("prompts", 0))
        prompts.add_metric(["failed"], counters.get("failed_prompts", 0))
        yield prompts
        for name in sorted(set(counters) | set(COUNTER_HELP)):
            if name not in SKIPPED:
                yield CounterMetricFamily(PREFIX + name, COUNTER_HELP.get(name, name.replace("_", " ")),
                                          value=counters.get(name, 0))
        for name, (buckets, total) in histograms.items():
            h = HistogramMetricFamily(PREFIX + name, HELP[name])
            h.add_metric([], [(str(le) if le != float("inf") else "+Inf", n) for le, n in buckets], total)
            yield h
        if self.writer is not None:
            results = CounterMetricFamily(PREFIX + "results", "results handed out, by transport (shm: a segment on "
                                          "the client's host; blob: a Redis blob)", labels=["transport"])
            sent = dict(self.writer.results)
            for transport in ("shm", "blob"):
                results.add_metric([transport], sent.get(transport, 0))
            yield results
        if self.pixels is not None:
            yield GaugeMetricFamily(PREFIX + "image_pixels_in_flight", "decoded image pixels held now, from decode "
                                    "to the end of compute", value=self.pixels.in_use)
            yield GaugeMetricFamily(PREFIX + "image_pixels_in_flight_peak", "the most decoded image pixels held at "
                                    "once since the worker started", value=self.pixels.peak)
            yield GaugeMetricFamily(PREFIX + "image_pixels_in_flight_max", "max_image_pixels_in_flight, the bound "
                                    "of both", value=self.pixels.capacity)
        depth = GaugeMetricFamily("encoder_broker_queue_depth", "jobs waiting in the queue", labels=["queue"])
        try:
            depth.add_metric([self.queue], self.connection.llen(self.queue_key))
        except (redis.RedisError, AttributeError):
            depth.add_metric([self.queue], float("nan"))
        yield depth


def start_metrics(port: int, tally: Tally, connection: redis.Redis | None, queue: str, worker: str = "",
                  writer=None, pixels=None):
    """Serves the worker's metrics on `port` (all interfaces) from a daemon thread; port 0: off."""
    if not port:
        return None
    registry = CollectorRegistry()
    registry.register(WorkerCollector(tally, connection, queue, worker, writer, pixels))
    try:
        server, _thread = start_http_server(port, registry=registry)
    except OSError as e:
        raise SystemExit(f"metrics port {port} in use: another worker? set EB_METRICS_PORT (0: off) ({e})")
    log.info("metrics on http://0.0.0.0:%d/metrics", port)
    return server
