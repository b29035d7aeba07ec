"""A worker's counters, batch-size histogram and recent latencies, written to Redis by one script call a batch
right after its results (workers.job_source STATS) and read by `python -m broker stats`."""

from __future__ import annotations

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


class WorkerStats:
    def __init__(self, queue: str, worker: str):
        self.key = stats_key(queue, worker)
        self.latency_key = latency_key(queue)

    def batch(self, *, jobs: int, failed: int, prompts: int, tokens: int, computed_tokens: int, cache_hits: int,
              cache_misses: int, latencies_ms: list[float], infer_ms: float, **extra) -> StatsUpdate:
        increments = dict(batches=1, jobs=jobs, failed=failed, prompts=prompts, tokens=tokens,
                          computed_tokens=computed_tokens, cache_hits=cache_hits, cache_misses=cache_misses,
                          infer_ms=round(infer_ms, 3), **extra)
        increments[bucket_of(jobs)] = 1
        return StatsUpdate(self.key, self.latency_key, increments, latencies_ms)

    def failures(self, failed: int) -> StatsUpdate:
        return StatsUpdate(self.key, self.latency_key, {"failed": failed})

    def runs_lost(self, lost: int) -> StatsUpdate:
        """Jobs run ahead of their claims (workers.worker) that another worker took."""
        return StatsUpdate(self.key, self.latency_key, {"runs_ahead_lost": lost})
