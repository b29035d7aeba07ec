"""An encoder worker's Prometheus metrics (metrics_port), scraped after real jobs."""

import pytest
from rq import Worker

from broker import EncoderClient
from broker.errors import EncodeFailed
from tests.conftest import TEST_MAX_PROMPT_TOKENS
from tests.helpers import eventually, scrape


def test_worker_metrics_count_real_jobs(encoder_worker, client):
    port = encoder_worker["metrics_port"]
    before = scrape(port)
    client.encode(["a red fox", "a blue fox", " "])
    client.encode(["a red fox"])  # the same prompt again: the encoding cache's
    with EncoderClient(encoder_worker["url"], timeout=30, transport="blob") as by_blob:
        by_blob.encode(["a red fox"])
    with pytest.raises(EncodeFailed):
        client.encode(["a fox", " fox" * (TEST_MAX_PROMPT_TOKENS + 1)])
    after = scrape(port)

    def grew(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert grew("encoder_broker_worker_jobs_total", (("outcome", "ok"),)) == 3
    assert grew("encoder_broker_worker_results_total", (("transport", "shm"),)) == 2
    assert grew("encoder_broker_worker_results_total", (("transport", "blob"),)) == 1
    assert grew("encoder_broker_worker_jobs_total", (("outcome", "failed"),)) == 1
    assert grew("encoder_broker_worker_prompts_total", (("outcome", "ok"),)) == 5
    assert grew("encoder_broker_worker_prompts_total", (("outcome", "failed"),)) == 2
    assert grew("encoder_broker_worker_cache_hits_total") >= 1
    assert grew("encoder_broker_worker_batches_total") >= 1
    assert grew("encoder_broker_worker_batch_jobs_count") == grew("encoder_broker_worker_batches_total")
    assert grew("encoder_broker_worker_job_latency_seconds_count") == 3
    assert grew("encoder_broker_worker_job_latency_seconds_sum") > 0
    assert grew("encoder_broker_worker_batch_tokens_sum") == grew("encoder_broker_worker_tokens_total") > 0
    assert after[("encoder_broker_worker_encode_seconds_bucket", (("le", "+Inf"),))] >= 1
    assert after[("encoder_broker_queue_depth", (("queue", "encode"),))] == 0


def test_rq_worker_counters_are_true(encoder_worker, client):
    """`rq info` reads RQ's worker counters: they follow the jobs the worker ran (a heartbeat behind at most)."""
    client.encode(["counted once"])
    with pytest.raises(EncodeFailed):
        client.encode(["a fox", " fox" * (TEST_MAX_PROMPT_TOKENS + 1)])
    conn = client.wire.redis

    def agree():
        (w,) = [w for w in Worker.all(connection=conn) if "encode" in w.queue_names()]
        m = scrape(encoder_worker["metrics_port"])
        return (w.successful_job_count >= 1 and w.failed_job_count >= 1
                and w.successful_job_count == m[("encoder_broker_worker_jobs_total", (("outcome", "ok"),))]
                and w.failed_job_count == m[("encoder_broker_worker_jobs_total", (("outcome", "failed"),))])

    assert eventually(agree)
