"""Prometheus metrics of the HTTP front, served at its /metrics (one registry per front)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class FrontMetrics:
    def __init__(self, queue: str, depth, segments):
        """`depth()`: the queue's length (read at scrape time); `segments()`: the front's AnswerSegments."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("encoder_broker_http_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=r)
        self.jobs = Counter("encoder_broker_http_jobs", "/generate requests by outcome (ok, refused: the request "
                            "was wrong, overloaded, timeout, unavailable, failed)", ["outcome"], registry=r)
        self.prompts = Counter("encoder_broker_http_prompts", "prompts encoded through /generate", registry=r)
        self.tokens = Histogram("encoder_broker_http_prompt_tokens", "tokens per /generate answer (the whole "
                                "templated prompt)", buckets=TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("encoder_broker_http_request_duration_seconds", "/generate end to end, as the "
                                 "front sees it", buckets=LATENCY_BUCKETS, registry=r)
        self.results = Counter("encoder_broker_http_results", "answers by how the states went (shm, base64, both)",
                               ["transport"], registry=r)
        Gauge("encoder_broker_queue_depth", "jobs waiting in the queue", ["queue"],
              registry=r).labels(queue).set_function(depth)
        Gauge("encoder_broker_http_live_segments", "answer segments not yet expired",
              registry=r).set_function(lambda: segments().live)
        Gauge("encoder_broker_http_live_segment_bytes", "bytes of answer segments not yet expired",
              registry=r).set_function(lambda: segments().live_bytes)
        self.shm_refused = Counter("encoder_broker_http_shm_refused", "shm answers sent as base64 alone, by "
                                   "reason (budget: shm_max_bytes spent; space: /dev/shm full or failing)",
                                   ["reason"], registry=r)
