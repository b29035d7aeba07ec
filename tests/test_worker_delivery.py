"""Who delivers a batch: the compute thread itself when the batch is all the worker holds, else the output thread;
and result segments reserved while the batch computes. A real worker object (its threads not started), a real
Redis, the tiny encoder; the results are read back as a client reads them."""

import os
import uuid

import pytest
import torch

from broker.client import EncoderClient
from broker.errors import EncodeFailed
from broker.results import raise_for_error, read_shm
from broker.schemas import Handle
from shm import SHM_DIR
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


def test_result_segments_are_reserved_while_the_batch_computes(worker_and_client, baseline):
    worker, client = worker_and_client
    ok, bad = submit(client, "kept result"), submit(client, "a job that fails")
    worker._admit(worker.source.take(None, 2, 60))
    batch = batch_of(worker, 2)
    enc = worker.runner.run(batch, while_device_runs=lambda: worker._reserve_segments(batch))
    reserved = dict(worker._reserved)
    assert set(reserved) == {ok[0], bad[0]}
    paths = {job: os.path.join(SHM_DIR, name.lstrip("/")) for job, (name, _) in reserved.items()}
    for job, (_, nbytes) in reserved.items():
        assert os.stat(paths[job]).st_size == nbytes  # sized from the token counts before the states exist
    enc.errors[bad[0]] = "encoder failed: as if its sequences had"
    del enc.outputs[bad[0]]
    worker._deliver_logged(enc)
    assert not worker._reserved and not os.path.exists(paths[bad[0]])  # the failed job's segment is gone
    outcome = client.wire.wait(*ok)
    handle = Handle.from_msgpack(raise_for_error(outcome))
    assert handle.location.lstrip("/") == reserved[ok[0]][0].lstrip("/")  # the result went into its reservation
    got = read_shm(handle)[0]
    assert torch.equal(got, baseline.encode(["kept result"])[0].to(got.dtype))
    with pytest.raises(EncodeFailed, match="as if its sequences had"):
        raise_for_error(client.wire.wait(*bad))


def test_a_reservation_of_another_size_is_dropped_for_a_fresh_segment(worker_and_client):
    worker, client = worker_and_client
    job_id, _ = submit(client, "any prompt")
    (taken,) = worker.source.take(None, 1, 60)
    name = worker.writer.reserve(job_id, 64)
    states = torch.randn(3, 9)  # 108 bytes, 128 laid out: not the 64 reserved
    handle = worker.writer.write(job_id, taken.request, [states], None, {}, reserved=(name, 64))
    assert handle.transport == "shm" and handle.location.lstrip("/") != name.lstrip("/")
    assert not os.path.exists(os.path.join(SHM_DIR, name.lstrip("/")))
    assert torch.equal(read_shm(handle)[0], states)
