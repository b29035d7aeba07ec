"""A worker's counters, batch-size histogram and recent latencies, written to Redis with each batch's RECORD
(workers.job_source) and read by `python -m broker stats`; the same figures are kept in the process too
(`Tally`), for its Prometheus exporter (workers.metrics)."""

from __future__ import annotations

import threading
from collections import Counter

from workers.job_source import StatsUpdate

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # batch sizes (jobs) are counted under the first bucket >= them


def bucket_of(n: int) -> str:
    for b in BATCH_BUCKETS:
        if n <= b:
            return f"batch_le_{b}"
    return "batch_gt_256"


def batch_stats(enc, *, failed: int, latencies_ms: list[float], results_rung: int) -> StatsUpdate:
    """The counters of one computed batch (workers.stages.types.Encoded)."""
    jobs = enc.batch.jobs
    failed_prompts = sum(len(p.tokens.ids) for p in jobs if p.taken.job_id in enc.errors)
    increments = dict(batches=1, jobs=len(jobs), failed=failed, failed_prompts=failed_prompts,
                      prompts=sum(len(p.tokens.ids) for p in jobs) - failed_prompts,
                      tokens=sum(p.n_tokens for p in jobs), computed_tokens=enc.computed_tokens,
                      cache_hits=enc.cache_hits, cache_misses=enc.cache_misses, infer_ms=round(enc.infer_ms, 3),
                      results_rung=results_rung)
    if enc.vision_computed or enc.vision_reused:  # i2i: vision tower runs vs reuses
        increments.update(vision_images_computed=enc.vision_computed, vision_images_reused=enc.vision_reused)
    if enc.expired:
        increments.update(expired_before_compute=enc.expired)
    increments[bucket_of(len(jobs))] = 1
    return StatsUpdate(increments, latencies_ms)


# Histogram bounds of the in-process tally (Prometheus's `le`, inclusive).
HISTOGRAM_BOUNDS = {
    "batch_jobs": BATCH_BUCKETS,
    "batch_tokens": (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768),
    "encode_seconds": (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
    "job_latency_seconds": (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
}


class Tally:
    """Counters and histograms of everything this worker has done, since it started (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: Counter = Counter()
        self._histograms = {name: ([0] * (len(bounds) + 1), [0.0]) for name, bounds in HISTOGRAM_BOUNDS.items()}

    def add(self, increments: dict, observations: dict) -> None:
        """`observations`: histogram name -> list of values."""
        with self._lock:
            self._counters.update({k: v for k, v in increments.items() if not k.startswith("batch_")})
            for name, values in observations.items():
                counts, total = self._histograms[name]
                bounds = HISTOGRAM_BOUNDS[name]
                for v in values:
                    counts[next((i for i, b in enumerate(bounds) if v <= b), len(bounds))] += 1
                    total[0] += v

    def snapshot(self) -> tuple[dict, dict]:
        """(counters, {histogram: ([(le, cumulative count)...] ending with +Inf, sum)})."""
        with self._lock:
            counters = dict(self._counters)
            histograms = {}
            for name, (counts, total) in self._histograms.items():
                cumulative, running = [], 0
                for le, c in zip((*HISTOGRAM_BOUNDS[name], float("inf")), counts):
                    running += c
                    cumulative.append((le, running))
                histograms[name] = (cumulative, total[0])
        return counters, histograms



def record_in(tally: Tally, update: StatsUpdate) -> None:
    """Adds what a RECORD writes to Redis to the in-process tally too."""
    inc = update.increments
    observations = {"job_latency_seconds": [ms / 1e3 for ms in update.latencies_ms]}
    if inc.get("batches"):
        observations.update(batch_jobs=[inc["jobs"]], batch_tokens=[inc["tokens"]],
                            encode_seconds=[inc["infer_ms"] / 1e3])
    tally.add({**inc, "jobs_ok": inc.get("jobs", 0) - inc.get("failed", 0) if inc.get("batches") else 0},
              observations)

