"""Who delivers a batch: the compute thread itself when the batch is all the worker holds, else the output thread.
A real worker object (its threads not started), a real Redis, the tiny encoder; the results are read back as a
client reads them."""

import uuid

import pytest
import torch

from broker.client import EncoderClient
from broker.results import read_shm
from broker.schemas import Handle
from tests.helpers import write_config
from workers.batch_runner import Batch
from workers.config import EncoderWorkerConfig
from workers.worker import EncoderWorker


@pytest.fixture
def worker_and_client(baseline, tiny_dir, redis_server, tmp_path):
    queue = "deliver-" + uuid.uuid4().hex[:8]
    cfg = write_config(str(tmp_path / "w.json"), model_dir=tiny_dir, backend="baseline", device="cpu",
                       redis_url=redis_server.url, queue=queue, shm_prefix="ebd" + uuid.uuid4().hex[:6],
                       cache_max_bytes=0)
    worker = EncoderWorker(EncoderWorkerConfig.from_json(cfg), baseline)
    client = EncoderClient(redis_server.url, queue=queue, timeout=30)
    yield worker, client
    client.close()


def submit(client, prompt: str) -> tuple[str, float]:
    deadline = client.wire.deadline()
    payload, description = client._payload([prompt], "t2i", None, deadline, False)
    return client.wire.submit(payload, deadline, description), deadline


def batch_of(worker, n: int) -> Batch:
    batch = Batch()
    for _ in range(n):
        batch.add(worker._pending.popleft())
    return batch


def read_result(client, job_id: str, deadline: float) -> torch.Tensor:
    outcome = client.wire.wait(job_id, deadline)
    assert outcome.error is None, outcome.error
    return read_shm(Handle.from_msgpack(outcome.value))[0]


def test_a_batch_alone_is_delivered_by_the_compute_thread(worker_and_client, baseline):
    worker, client = worker_and_client
    job_id, deadline = submit(client, "a lone red fox")
    worker._admit(worker.source.take(None, 1, 60))
    enc = worker.runner.run(batch_of(worker, 1))
    assert worker._deliver_alone(enc)
    assert worker._done.empty() and not worker._held  # delivered here, nothing left held
    got = read_result(client, job_id, deadline)
    assert torch.equal(got, baseline.encode(["a lone red fox"])[0].to(got.dtype))


def test_a_batch_with_other_jobs_held_goes_to_the_output_thread(worker_and_client, baseline):
    worker, client = worker_and_client
    first, second = submit(client, "first prompt"), submit(client, "second prompt")
    worker._admit(worker.source.take(None, 2, 60))
    enc = worker.runner.run(batch_of(worker, 1))  # the second job stays pending: the worker holds more
    assert not worker._deliver_alone(enc)
    assert len(worker._held) == 2  # not delivered: still the worker's to deliver
    worker._deliver_logged(enc)  # what the output thread does with it
    assert list(worker._held) == [second[0]]
    got = read_result(client, *first)
    assert torch.equal(got, baseline.encode(["first prompt"])[0].to(got.dtype))
    # the last job alone again, but the output thread is busy delivering: it waits for the output thread
    enc = worker.runner.run(batch_of(worker, 1))
    with worker._delivering:
        assert not worker._deliver_alone(enc)
    assert worker._deliver_alone(enc)
    got = read_result(client, *second)
    assert torch.equal(got, baseline.encode(["second prompt"])[0].to(got.dtype))
