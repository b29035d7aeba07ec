"""What `python -m broker stats` shows: queue depth, registries, each worker's state and counters, the batch
size histogram, p50/p99 latency and the cache hit rate, read from what workers write with each batch."""

from __future__ import annotations

import time

import redis

from broker.protocol.keys import QueueKeys
from broker.protocol.queues import DEFAULT_QUEUE

# results_rung: results handed to their client by doorbell (broker.protocol.doorbell)
STAT_FIELDS = ("batches", "jobs", "failed", "prompts", "failed_prompts", "tokens", "computed_tokens", "cache_hits",
               "cache_misses", "results_rung")


def _text(x):
    return x.decode() if isinstance(x, bytes) else x


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def collect(conn: redis.Redis, queue: str = DEFAULT_QUEUE) -> dict:
    q = QueueKeys(queue)
    pipe = conn.pipeline(transaction=False)
    pipe.llen(q.queue)
    pipe.zcard(q.started)
    pipe.zcard(q.finished)
    pipe.zcard(q.failed)
    pipe.get(q.bound)
    pipe.lrange(q.latency, 0, -1)
    pipe.smembers(q.workers)
    depth, started, finished, failed, bound, lat, worker_keys = pipe.execute()

    workers, totals, histogram = [], dict.fromkeys(STAT_FIELDS, 0), {}
    for wkey in sorted(_text(k) for k in worker_keys):
        name = wkey.rsplit(":", 1)[-1]
        info = {_text(k): _text(v) for k, v in conn.hgetall(wkey).items()}
        stats = {_text(k): _text(v) for k, v in conn.hgetall(q.stats(name)).items()}
        counters = {f: int(stats.get(f, 0)) for f in STAT_FIELDS}
        for f in STAT_FIELDS:
            totals[f] += counters[f]
        for k, v in stats.items():
            if k.startswith("batch_"):
                histogram[k] = histogram.get(k, 0) + int(v)
        workers.append({"name": name, "state": info.get("state", "?"), "host": info.get("hostname", ""),
                        "pid": info.get("pid", ""), "device": info.get("device", ""),
                        "dtype": info.get("dtype", ""), "quantization": info.get("quantization", ""),
                        "last_heartbeat": info.get("last_heartbeat", ""),
                        **counters})
    latencies = sorted(float(x) for x in lat)
    lookups = totals["cache_hits"] + totals["cache_misses"]
    return {
        "queue": queue,
        "depth": depth,
        "bound": int(bound) if bound else 0,
        "started": started,
        "finished": finished,
        "failed": failed,
        "workers": workers,
        "totals": totals,
        "batch_histogram": dict(sorted(histogram.items(), key=lambda kv: _bucket_order(kv[0]))),
        "latency_ms": {"samples": len(latencies), "p50": percentile(latencies, 50),
                       "p99": percentile(latencies, 99)},
        "cache_hit_rate": totals["cache_hits"] / lookups if lookups else None,
        "mean_batch_jobs": totals["jobs"] / totals["batches"] if totals["batches"] else None,
        "at": time.time(),
    }


def _bucket_order(name: str) -> int:
    return int(name.rsplit("_", 1)[-1]) + (1000 if "gt" in name else 0)


def format_stats(s: dict) -> str:
    def f(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    lines = [
        f"queue {s['queue']!r}: {s['depth']} waiting (bound {s['bound'] or 'none'}), {s['started']} started, "
        f"{s['finished']} finished, {s['failed']} failed (in RQ's registries)",
        f"latency (last {s['latency_ms']['samples']} jobs, enqueue to result): p50 {f(s['latency_ms']['p50'])} ms, "
        f"p99 {f(s['latency_ms']['p99'])} ms",
        f"cache hit rate {f(s['cache_hit_rate'] and s['cache_hit_rate'] * 100)}%, mean batch "
        f"{f(s['mean_batch_jobs'])} jobs, {s['totals']['computed_tokens']} of {s['totals']['tokens']} tokens computed",
        f"same-host doorbells: {s['totals']['results_rung']} results rung to their clients",
        "batch sizes (jobs): " + (", ".join(f"{k.replace('batch_', '')}: {v}" for k, v in s["batch_histogram"].items())
                                  or "none yet"),
        f"workers ({len(s['workers'])}):",
    ]
    for w in s["workers"]:
        compute = "".join(f", {x}" for x in (w.get("dtype"), w.get("quantization")) if x)  # what EB_DTYPE gave
        lines.append(f"  {w['name']}  {w['state']:<5}  host {w['host']} pid {w['pid']} on {w['device'] or '?'}"
                     f"{compute}  "
                     f"{w['batches']} batches, {w['jobs']} jobs, {w['failed']} failed, "
                     f"last heartbeat {w['last_heartbeat']}")
    return "\n".join(lines)
