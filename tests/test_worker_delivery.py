"""Who delivers a batch: the compute thread itself when the batch is all the worker holds, else the output thread;
and result segments reserved while the batch computes. A real worker object (its threads not started), a real
Redis, the tiny encoder; the results are read back as a client reads them."""

import os
import time
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
    reserved = {p.taken.job_id: p.reserved for p in batch.jobs}
    assert set(reserved) == {ok[0], bad[0]} and None not in reserved.values()
    paths = {job: os.path.join(SHM_DIR, name.lstrip("/")) for job, (name, _) in reserved.items()}
    for job, (_, nbytes) in reserved.items():
        assert os.stat(paths[job]).st_size == nbytes  # sized from the token counts before the states exist
    enc.errors[bad[0]] = "encoder failed: as if its sequences had"
    del enc.outputs[bad[0]]
    worker._deliver_logged(enc)
    assert not any(p.reserved for p in batch.jobs)
    assert not os.path.exists(paths[bad[0]])  # the failed job's segment is gone
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


def ring_worker(client, worker, prompt: str, rung_request: bytes | None = None) -> tuple[str, float]:
    """Enqueues `prompt` as a client on this host does when it rings the worker (the ring carries
    `rung_request`, by default the job's own request)."""
    from broker.doorbell import Ringer

    ringer = Ringer()
    deadline = client.wire.deadline()
    payload, description = client._payload([prompt], "t2i", None, deadline, False)
    job_id = client.wire.submit(payload, deadline, description, ring=lambda job_id: ringer.ring(
        worker.bell.name, job_id, request=payload if rung_request is None else rung_request))
    ringer.close()
    return job_id, deadline


def worker_stats(worker) -> dict:
    import redis

    raw = redis.Redis.from_url(worker.config.redis_url).hgetall(worker.stats.key)
    return {k.decode(): float(v) for k, v in raw.items()}


def segments_of(worker) -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(worker.config.shm_prefix)}


def run_ahead_batch(worker) -> Batch:
    """The batch _take_rung handed to the compute thread (this test's worker runs no threads)."""
    batch = worker._ready.get_nowait()
    assert batch.claims_settled is not None and batch.claims_settled.is_set()
    return batch


def test_an_idle_worker_runs_a_rung_job_while_its_claim_runs(worker_and_client, baseline):
    worker, client = worker_and_client
    job_id, deadline = ring_worker(client, worker, "a heron in reeds")
    assert worker._take_rung() == []  # nothing left to admit: the job already runs
    batch = run_ahead_batch(worker)
    (p,) = batch.jobs
    assert (p.taken.job_id, p.taken.rung, p.lost) == (job_id, True, False)
    assert p.taken.exec_id  # the claimed job, started in Redis
    assert list(worker._held) == [job_id]
    enc = worker.runner.run(batch, while_device_runs=lambda: worker._reserve_segments(batch))
    assert worker._deliver_alone(enc)
    got = read_result(client, job_id, deadline)
    assert torch.equal(got, baseline.encode(["a heron in reeds"])[0].to(got.dtype))
    stats = worker_stats(worker)
    assert (stats["jobs"], stats["jobs_claimed_by_ring"], stats["jobs_run_ahead"]) == (1, 1, 1)
    assert not worker._held


def test_a_ring_whose_request_differs_from_the_queued_job_is_not_trusted(worker_and_client, baseline):
    worker, client = worker_and_client
    other = client._payload(["something else entirely"], "t2i", None, client.wire.deadline(), False)[0]
    job_id, deadline = ring_worker(client, worker, "the queued prompt", rung_request=other)
    (taken,) = worker._take_rung()  # claimed: Redis's record decides what runs
    assert taken.job_id == job_id and taken.request.prompts == ["the queued prompt"]
    ahead = run_ahead_batch(worker)
    assert [p.lost for p in ahead.jobs] == [True]
    enc = worker.runner.run(ahead, while_device_runs=lambda: worker._reserve_segments(ahead))
    worker._deliver_logged(enc)  # delivers nothing
    assert not segments_of(worker)
    worker._admit([taken])
    enc = worker.runner.run(batch_of(worker, 1))
    assert worker._deliver_alone(enc)
    got = read_result(client, job_id, deadline)
    assert torch.equal(got, baseline.encode(["the queued prompt"])[0].to(got.dtype))


def test_a_job_run_ahead_that_another_worker_took_is_dropped(worker_and_client, baseline):
    worker, client = worker_and_client
    job_id, deadline = ring_worker(client, worker, "taken elsewhere")
    (elsewhere,) = worker.source.take(None, 1, 60)  # as another worker's take would
    assert elsewhere.job_id == job_id
    assert worker._take_rung() == []
    ahead = run_ahead_batch(worker)
    assert [p.lost for p in ahead.jobs] == [True] and not worker._held
    enc = worker.runner.run(ahead, while_device_runs=lambda: worker._reserve_segments(ahead))
    assert worker._deliver_alone(enc)
    assert not segments_of(worker)  # its reserved segment is gone
    assert worker_stats(worker)["runs_ahead_lost"] == 1 and "jobs" not in worker_stats(worker)
    with pytest.raises(Exception):  # nothing recorded for it: the other worker's to answer
        client.wire.wait(job_id, time.time() + 0.5)


def test_a_busy_worker_hands_rung_jobs_on_through_redis(worker_and_client):
    import redis

    from broker.enqueue import queue_key, wake_key

    worker, client = worker_and_client
    r = redis.Redis.from_url(worker.config.redis_url)
    worker._device_idle.clear()  # as while the device runs a batch
    job_id, _ = ring_worker(client, worker, "a busy moment")
    assert r.llen(wake_key(worker.queue)) == 0  # rung: no wake-up through Redis yet
    assert worker._take_rung() == [] and worker._ready.empty()
    assert r.llen(wake_key(worker.queue)) == 1  # any worker's wait now takes it
    assert r.lrange(queue_key(worker.queue), 0, -1) == [job_id.encode()]


def test_a_ring_heard_late_is_claimed_but_not_run_ahead(worker_and_client, baseline):
    from broker.doorbell import Ring
    from workers.worker import RUN_AHEAD_WITHIN_S

    worker, client = worker_and_client
    job_id, deadline = ring_worker(client, worker, "a ring that waited")
    (ring,) = worker.bell.drain()
    late = Ring(job_id, request=ring.request, sent_at=time.time() - 10 * RUN_AHEAD_WITHIN_S)
    send_ring(worker, late)
    (taken,) = worker._take_rung()  # claimed, to run as any taken job
    assert taken.job_id == job_id and worker._ready.empty()
    worker._admit([taken])
    enc = worker.runner.run(batch_of(worker, 1))
    assert worker._deliver_alone(enc)
    got = read_result(client, job_id, deadline)
    assert torch.equal(got, baseline.encode(["a ring that waited"])[0].to(got.dtype))


def test_a_late_ring_for_a_job_this_worker_took_is_ignored(worker_and_client):
    import redis

    from broker.doorbell import Ring
    from broker.enqueue import wake_key

    worker, client = worker_and_client
    job_id, _ = ring_worker(client, worker, "taken through Redis first")
    worker._admit(worker.source.take(None, 1, 60))  # as a wait woken by another job's token takes it
    assert worker._take_rung() == [] and worker._ready.empty()  # no second run, no claim
    worker._device_idle.clear()
    send_ring(worker, Ring(job_id, sent_at=time.time()))
    assert worker._take_rung() == []
    assert redis.Redis.from_url(worker.config.redis_url).llen(wake_key(worker.queue)) == 0  # nor handed on


def send_ring(worker, ring) -> None:
    """Queues `ring` on the worker's doorbell as a client would."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(ring.to_msgpack(), "\0" + worker.bell.name)


def test_a_lone_batch_rung_to_its_client_is_recorded_off_the_compute_thread(worker_and_client, baseline):
    from broker.doorbell import Doorbell

    worker, client = worker_and_client
    bell = Doorbell()
    deadline = client.wire.deadline()
    payload, description = client._payload(["rung back"], "t2i", None, deadline, False, bell)
    job_id = client.wire.submit(payload, deadline, description)
    worker._admit(worker.source.take(None, 1, 60))
    enc = worker.runner.run(batch_of(worker, 1))
    assert worker._deliver_alone(enc)
    handle, stale = bell.take(job_id)
    assert handle is not None and not stale  # the client has its result ...
    (handed,) = list(worker._to_record.queue)  # ... and the record waits for the recorder thread
    assert list(worker._held) == [job_id] and worker._awaiting_record == 1
    with pytest.raises(Exception):
        client.wire.wait(job_id, time.time() + 0.3)  # not in Redis yet
    # the worker holds no other work: a next lone batch is still delivered by the compute thread
    second = submit(client, "the next request")
    worker._admit(worker.source.take(None, 1, 60))
    assert worker._deliver_alone(worker.runner.run(batch_of(worker, 1)))
    got = read_result(client, *second)
    assert torch.equal(got, baseline.encode(["the next request"])[0].to(got.dtype))
    worker._to_record.put(None)
    worker._recorder_loop()  # what the recorder thread does
    outcome = client.wire.wait(job_id, deadline)
    assert Handle.from_msgpack(raise_for_error(outcome)).location == Handle.from_msgpack(handle).location
    assert not worker._held and worker._awaiting_record == 0
    got = read_shm(Handle.from_msgpack(handle))[0]
    assert torch.equal(got, baseline.encode(["rung back"])[0].to(got.dtype))
    bell.close()
