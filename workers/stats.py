"""A worker's counters, batch-size histogram and recent latencies, written to Redis by one script call a batch
right after its results (workers.job_source STATS) and read by `python -m broker stats`; the same figures are
kept in the process too (`Tally`), for its Prometheus exporter (workers.metrics)."""

from __future__ import annotations

import threading
from collections import Counter

from workers.job_source import StatsUpdate

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # batch sizes (jobs) are counted under the first bucket >= them


def stats_key(queue: str, worker: str) -> str:
    return f"eb:stats:{queue}:{worker}"


def latency_key(queue: str) -> str:
    return f"eb:latency:{queue}"


def bucket_of(n: int) -> str:
    for b in BATCH_BUCKETS:
        if n <= b:
            return f"batch_le_{b}"
    return "batch_gt_256"


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


class WorkerStats:
    def __init__(self, queue: str, worker: str):
        self.key = stats_key(queue, worker)
        self.latency_key = latency_key(queue)
        self.tally = Tally()

    def batch(self, *, jobs: int, failed: int, prompts: int, tokens: int, computed_tokens: int, cache_hits: int,
              cache_misses: int, latencies_ms: list[float], infer_ms: float, **extra) -> StatsUpdate:
        increments = dict(batches=1, jobs=jobs, failed=failed, prompts=prompts, tokens=tokens,
                          computed_tokens=computed_tokens, cache_hits=cache_hits, cache_misses=cache_misses,
                          infer_ms=round(infer_ms, 3), **extra)
        increments[bucket_of(jobs)] = 1
        self.tally.add({**increments, "jobs_ok": jobs - failed}, {"batch_jobs": [jobs], "batch_tokens": [tokens],
                                                                   "encode_seconds": [infer_ms / 1e3],
                                                                   "job_latency_seconds": [ms / 1e3 for ms in latencies_ms]})
        return StatsUpdate(self.key, self.latency_key, increments, latencies_ms)

    def failures(self, failed: int) -> StatsUpdate:
        self.tally.add({"failed": failed}, {})
        return StatsUpdate(self.key, self.latency_key, {"failed": failed})

    def runs_lost(self, lost: int) -> StatsUpdate:
        """Jobs run ahead of their claims (workers.worker) that another worker took."""
        self.tally.add({"runs_ahead_lost": lost}, {})
        return StatsUpdate(self.key, self.latency_key, {"runs_ahead_lost": lost})
