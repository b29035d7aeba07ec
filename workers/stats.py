"""A worker's counters, batch-size histogram and recent latencies, written to Redis with each batch's RECORD
(workers.job_source) and read by `python -m broker stats`."""

from __future__ import annotations

from workers.job_source import StatsUpdate

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # batch sizes (jobs) are counted under the first bucket >= them


def bucket_of(n: int) -> str:
    for b in BATCH_BUCKETS:
        if n <= b:
            return f"batch_le_{b}"
    return "batch_gt_256"


def batch_stats(enc, *, failed: int, latencies_ms: list[float], results_rung: int) -> StatsUpdate:
    """The counters of one computed batch (workers.batch_runner.Encoded)."""
    jobs = enc.batch.jobs
    increments = dict(batches=1, jobs=len(jobs), failed=failed, prompts=sum(len(p.tokens.ids) for p in jobs),
                      tokens=sum(p.n_tokens for p in jobs), computed_tokens=enc.computed_tokens,
                      cache_hits=enc.cache_hits, cache_misses=enc.cache_misses, infer_ms=round(enc.infer_ms, 3),
                      results_rung=results_rung)
    if enc.vision_computed or enc.vision_reused:  # i2i: vision tower runs vs reuses
        increments.update(vision_images_computed=enc.vision_computed, vision_images_reused=enc.vision_reused)
    increments[bucket_of(len(jobs))] = 1
    return StatsUpdate(increments, latencies_ms)
