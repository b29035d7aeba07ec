"""The encoder worker's stages, driven through their public methods: intake forms batches of taken, checked and
tokenized jobs; compute runs them; delivery writes, rings and records them. A real worker object (its threads not
started), a real Redis, the tiny encoder; the results are read back as a client reads them."""

import queue

import pytest
import redis
import torch

from broker.errors import EncodeFailed
from broker.protocol import keys
from broker.protocol.doorbell import Doorbell
from broker.protocol.schemas import Handle
from broker.results import raise_for_error, read_shm
from tests.helpers import assert_encoded, free_port, shm_names, stage_worker, stage_worker_client, submit_prompt


@pytest.fixture
def worker(baseline, tiny_dir, redis_server, tmp_path):
    return stage_worker(baseline, tiny_dir, redis_server.url, tmp_path, "deliver")


@pytest.fixture
def client(worker):
    """Here, a client of `worker`'s queue (conftest's is one of the encoder worker process)."""
    with stage_worker_client(worker) as c:
        yield c


def read_result(client, job_id: str, deadline: float) -> torch.Tensor:
    handle = Handle.from_msgpack(raise_for_error(client.wire.wait(job_id, deadline)))
    return read_shm(handle, prefix=client.shm_prefix)[0]


def test_a_job_goes_through_intake_compute_and_delivery(worker, client, baseline):
    jobs = {p: submit_prompt(client, p) for p in ("a lone red fox", "a second prompt")}
    batch = worker.intake.next_batch()
    assert sorted(p.taken.job_id for p in batch.jobs) == sorted(j for j, _ in jobs.values())
    r = redis.Redis.from_url(worker.config.redis_url)
    assert r.zcard(keys.QueueKeys(worker.queue).started) == 2  # started in Redis from the take on
    worker.delivery.deliver(worker.compute.compute(batch))
    for prompt, (job_id, deadline) in jobs.items():
        assert_encoded(read_result(client, job_id, deadline), prompt, baseline)
    assert r.zcard(keys.QueueKeys(worker.queue).started) == 0
    assert not r.smembers(keys.worker_executions(worker.name))  # nothing left for the heartbeat to keep
    stats = {k.decode(): float(v) for k, v in r.hgetall(keys.QueueKeys(worker.queue).stats(worker.name)).items()}
    assert (stats["batches"], stats["jobs"], stats["batch_le_2"]) == (1, 2, 1)


def test_a_bad_job_fails_at_intake_and_the_good_ones_batch_on(worker, client, baseline):
    good = submit_prompt(client, "a good prompt")
    long_job = submit_prompt(client, "word " * 200)  # over the tiny test encoder's max_prompt_tokens
    batch = worker.intake.next_batch()
    assert [p.taken.job_id for p in batch.jobs] == [good[0]]
    with pytest.raises(EncodeFailed, match="max_prompt_tokens"):
        raise_for_error(client.wire.wait(*long_job))
    worker.delivery.deliver(worker.compute.compute(batch))
    assert_encoded(read_result(client, *good), "a good prompt", baseline)


def test_a_job_the_encoder_failed_fails_alone_at_delivery(worker, client, baseline):
    ok, bad = submit_prompt(client, "kept result"), submit_prompt(client, "a job that fails")
    enc = worker.compute.compute(worker.intake.next_batch())
    enc.errors[bad[0]] = "encoder failed: as if its sequences had"
    del enc.outputs[bad[0]]
    worker.delivery.deliver(enc)
    handle = Handle.from_msgpack(raise_for_error(client.wire.wait(*ok)))
    assert shm_names(worker.config.shm_prefix) == [handle.location.lstrip("/")]  # none for the failed job
    assert_encoded(read_shm(handle, prefix=client.shm_prefix)[0], "kept result", baseline)
    with pytest.raises(EncodeFailed, match="as if its sequences had"):
        raise_for_error(client.wire.wait(*bad))


def test_delivery_rings_the_client_then_records_the_result(worker, client, baseline):
    bell = Doorbell()
    job_id, deadline = submit_prompt(client, "rung back", bell.name)
    worker.delivery.deliver(worker.compute.compute(worker.intake.next_batch()))
    handle, stale = bell.take(job_id)
    assert handle is not None and not stale
    outcome = client.wire.wait(job_id, deadline)  # Redis has the same handle
    assert outcome.value == handle
    r = redis.Redis.from_url(worker.config.redis_url)
    assert float(r.hget(keys.QueueKeys(worker.queue).stats(worker.name), "results_rung")) == 1
    assert_encoded(read_shm(Handle.from_msgpack(handle), prefix=client.shm_prefix)[0], "rung back", baseline)
    bell.close()


def test_a_batch_whose_record_fails_leaves_no_segment(worker, client):
    """Redis gone while delivering: the results nobody was told of are unlinked; the jobs stay started, for
    recovery to retry."""
    submit_prompt(client, "never recorded")
    batch = worker.intake.next_batch()
    enc = worker.compute.compute(batch)
    worker.source.connection.connection_pool = redis.ConnectionPool(port=free_port())  # nothing listens there
    worker.delivery.deliver(enc)  # logs, does not raise
    assert not shm_names(worker.config.shm_prefix)


def test_a_stopping_intake_hands_on_every_job_it_holds_then_ends(worker, client, baseline):
    jobs = [submit_prompt(client, f"held job {i}") for i in range(3)]
    worker.intake.admit(worker.source.take(3, 60))  # taken and tokenized: this worker's to run
    worker.intake.policy.max_batch_requests = 1
    worker.links.ready = queue.Queue()  # (no compute thread here to take each batch as it comes)
    worker.links.stopping.set()
    worker.intake.run()  # what the intake thread does once the worker stops: what it holds, then None
    batches = [worker.links.ready.get_nowait() for _ in range(3)]
    assert worker.links.ready.get_nowait() is None
    for batch in batches:
        assert len(batch.jobs) == 1
        worker.delivery.deliver(worker.compute.compute(batch))
    for i, (job_id, deadline) in enumerate(jobs):
        assert_encoded(read_result(client, job_id, deadline), f"held job {i}", baseline)
