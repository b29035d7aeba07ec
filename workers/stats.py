"""A worker's counters, batch-size histogram and recent latencies, written to Redis with each batch's
pipeline (no extra round trip) and read by `python -m broker stats`."""

from __future__ import annotations

import time

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # batch sizes (jobs) are counted under the first bucket >= them
LATENCY_SAMPLES = 2000
STATS_TTL_S = 24 * 3600


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

    def record_batch(self, pipe, *, jobs: int, failed: int, prompts: int, tokens: int, computed_tokens: int,
                     cache_hits: int, cache_misses: int, latencies_ms: list[float], infer_ms: float) -> None:
        pipe.hincrby(self.key, "batches", 1)
        pipe.hincrby(self.key, "jobs", jobs)
        pipe.hincrby(self.key, "failed", failed)
        pipe.hincrby(self.key, "prompts", prompts)
        pipe.hincrby(self.key, "tokens", tokens)
        pipe.hincrby(self.key, "computed_tokens", computed_tokens)
        pipe.hincrby(self.key, "cache_hits", cache_hits)
        pipe.hincrby(self.key, "cache_misses", cache_misses)
        pipe.hincrbyfloat(self.key, "infer_ms", infer_ms)
        pipe.hincrby(self.key, bucket_of(jobs), 1)
        pipe.hset(self.key, "last_batch_at", time.time())
        pipe.expire(self.key, STATS_TTL_S)
        if latencies_ms:
            pipe.lpush(self.latency_key, *[round(x, 3) for x in latencies_ms])
            pipe.ltrim(self.latency_key, 0, LATENCY_SAMPLES - 1)
            pipe.expire(self.latency_key, STATS_TTL_S)

    def record_failures(self, pipe, failed: int) -> None:
        if failed:
            pipe.hincrby(self.key, "failed", failed)
            pipe.expire(self.key, STATS_TTL_S)
