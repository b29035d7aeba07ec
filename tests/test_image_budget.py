"""Image jobs within the per-job limits, bounded together: the worker holds at most max_image_pixels_in_flight
decoded pixels, a job past it waits for room (or fails at once if it alone is over it), and a job whose client's
deadline passes before compute is dropped uncomputed while the rest runs. A real Redis, the tiny encoder; a real
worker process, or a real worker object whose stages the test drives one at a time."""

import asyncio
import io
import queue
import threading
import time
import uuid

import numpy as np
import pytest
import redis
from PIL import Image

from broker.client import EncoderClient
from broker.errors import EncodeFailed
from broker.protocol import keys
from broker.protocol.host import host_id
from broker.protocol.schemas import EncodeRequest, Handle
from broker.results import raise_for_error, read_shm
from tests.helpers import (free_port, scrape, stage_worker, stage_worker_client, start_worker, stop_process,
                           wait_for_workers)
from tests.test_broker_e2e import assert_same

SIDE = 512
ONE_IMAGE = SIDE * SIDE


def png(seed: int, side: int = SIDE) -> bytes:
    """A flat picture of one colour per seed: small on the wire, side x side pixels decoded."""
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), seed % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def budget_worker(tiny_dir, redis_server, tmp_path_factory):
    """A worker process that holds at most two 512x512 images decoded at once."""
    d = tmp_path_factory.mktemp("pixel-budget")
    queue_name, port, prefix = "budget-" + uuid.uuid4().hex[:8], free_port(), "ebb" + uuid.uuid4().hex[:6]
    before = redis.Redis.from_url(redis_server.url).scard(f"rq:workers:{queue_name}")
    proc, log = start_worker(d, "budget", model_dir=tiny_dir, backend="baseline", device="cpu",
                             redis_url=redis_server.url, queue=queue_name, shm_prefix=prefix,
                             max_image_pixels_in_flight=2 * ONE_IMAGE, metrics_port=port, cache_max_bytes=0)
    wait_for_workers(redis_server.url, before + 1, proc, log, queue=queue_name)
    yield {"url": redis_server.url, "queue": queue_name, "proc": proc, "port": port, "prefix": prefix}
    stop_process(proc)


def test_concurrent_big_image_jobs_stay_within_the_budget_and_are_all_right(budget_worker, baseline):
    jobs = [[png(10 * i + 1), png(10 * i + 2)] for i in range(5)]  # each needs the whole budget
    over = [png(201), png(202), png(203)]  # three images: over the budget on its own

    async def run():
        c = EncoderClient(budget_worker["url"], queue=budget_worker["queue"], timeout=120,
                          shm_prefix=budget_worker["prefix"])
        try:
            calls = [c.aencode([f"edit {i}", " "], task="i2i", images=imgs) for i, imgs in enumerate(jobs)]
            calls += [c.aencode(["a text job"]), c.aencode(["too much"], task="i2i", images=over)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await c.aclose()

    *got, text, refused = asyncio.run(run())
    for i, (imgs, g) in enumerate(zip(jobs, got)):
        assert not isinstance(g, BaseException), g
        assert_same(g, baseline.encode([f"edit {i}", " "], task="i2i", images=[imgs, imgs]))
    assert_same(text, baseline.encode(["a text job"]))
    assert isinstance(refused, EncodeFailed), refused
    assert f"{3 * ONE_IMAGE} pixels, over max_image_pixels_in_flight {2 * ONE_IMAGE}" in str(refused)
    m = scrape(budget_worker["port"])
    assert m[("encoder_broker_worker_image_pixels_in_flight_max", ())] == 2 * ONE_IMAGE
    assert m[("encoder_broker_worker_image_pixels_in_flight_peak", ())] == 2 * ONE_IMAGE  # never more
    assert m[("encoder_broker_worker_image_pixels_in_flight", ())] == 0  # every job's pixels given back
    assert budget_worker["proc"].poll() is None


# --- the stages, driven one at a time -------------------------------------------------------------------------

@pytest.fixture
def worker(baseline, tiny_dir, redis_server, tmp_path):
    """A worker object (threads not started) whose budget holds one 512x512 image."""
    return stage_worker(baseline, tiny_dir, redis_server.url, tmp_path, "budget", max_image_pixels_in_flight=ONE_IMAGE)


@pytest.fixture
def client(worker):
    with stage_worker_client(worker) as c:
        yield c


def submit(client, prompts, images=None, within_s: float | None = None) -> tuple[str, float]:
    """Enqueues an encode as EncoderClient does, its deadline `within_s` from now (else the client's): (id,
    deadline)."""
    deadline = time.time() + within_s if within_s is not None else client.wire.deadline()
    req = EncodeRequest(prompts=prompts, task="i2i" if images else "t2i", images=images or [],
                        client_host=host_id(), deadline=deadline)
    return client.wire.submit(req.validate().to_msgpack(), deadline), deadline


def result(client, job_id: str, deadline: float):
    return read_shm(Handle.from_msgpack(raise_for_error(client.wire.wait(job_id, deadline))),
                    prefix=client.shm_prefix)


def until_past(deadline: float) -> None:
    while time.time() <= deadline:
        time.sleep(0.05)


def stats(worker) -> dict:
    r = redis.Redis.from_url(worker.config.redis_url)
    return {k.decode(): float(v) for k, v in r.hgetall(keys.QueueKeys(worker.queue).stats(worker.name)).items()}


def test_a_job_whose_deadline_passes_while_it_waits_for_room_is_failed_not_computed(worker, client, baseline):
    first = submit(client, ["first"], [[png(1)]])
    late = submit(client, ["late"], [[png(2)]], within_s=1.5)  # its client gives up before room frees
    text = submit(client, ["text goes by"])
    batch = worker.intake.next_batch()  # takes all three: the second image job finds no room
    assert sorted(p.taken.job_id for p in batch.jobs) == sorted([first[0], text[0]])
    assert worker.links.pixels.in_use == ONE_IMAGE
    until_past(late[1])  # the batch ahead is slow
    worker.delivery.deliver(worker.compute.compute(batch))
    assert worker.links.pixels.in_use == 0
    assert worker.intake.next_batch() is None  # the late job fails as it would get room; nothing else queued
    with pytest.raises(EncodeFailed, match="deadline passed before compute"):
        raise_for_error(client.wire.wait(late[0], time.time() + 10))
    assert_same(result(client, *first), baseline.encode(["first"], task="i2i", images=[[png(1)]]))
    assert_same(result(client, *text), baseline.encode(["text goes by"]))
    s = stats(worker)
    assert (s["expired_before_compute"], s["batches"], s["jobs"], s["failed"]) == (1, 1, 2, 1)  # never batched
    after = submit(client, ["a text job sent afterwards"])
    worker.delivery.deliver(worker.compute.compute(worker.intake.next_batch()))
    assert_same(result(client, *after), baseline.encode(["a text job sent afterwards"]))


def test_a_job_whose_deadline_passes_before_compute_is_dropped_and_the_rest_of_its_batch_runs(worker, client,
                                                                                             baseline):
    gone = submit(client, ["its client has gone"], [[png(3)]], within_s=1.5)
    kept = submit(client, ["kept"])
    batch = worker.intake.next_batch()
    assert sorted(p.taken.job_id for p in batch.jobs) == sorted([gone[0], kept[0]])
    until_past(gone[1])  # the batch ahead is slow
    enc = worker.compute.compute(batch)
    (kept_job,) = [p for p in batch.jobs if p.taken.job_id == kept[0]]
    assert enc.computed_tokens == kept_job.n_tokens and enc.vision_computed == 0  # only the kept job ran
    assert worker.links.pixels.in_use == 0
    worker.delivery.deliver(enc)
    with pytest.raises(EncodeFailed, match="deadline passed before compute"):
        raise_for_error(client.wire.wait(gone[0], time.time() + 10))
    assert_same(result(client, *kept), baseline.encode(["kept"]))
    s = stats(worker)
    assert (s["expired_before_compute"], s["jobs"], s["failed"], s["prompts"]) == (1, 2, 1, 1)


def test_a_job_over_the_whole_budget_fails_at_once_naming_the_key(worker, client, baseline):
    big = submit(client, ["too big"], [[png(4, side=SIDE + 32)]])
    fits = submit(client, ["fits"], [[png(5)]])
    batch = worker.intake.next_batch()
    assert [p.taken.job_id for p in batch.jobs] == [fits[0]]
    with pytest.raises(EncodeFailed, match=rf"over max_image_pixels_in_flight {ONE_IMAGE}"):
        raise_for_error(client.wire.wait(*big))
    worker.delivery.deliver(worker.compute.compute(batch))
    assert_same(result(client, *fits), baseline.encode(["fits"], task="i2i", images=[[png(5)]]))


def test_a_job_whose_images_fail_to_decode_gives_its_room_back(worker, client, baseline):
    truncated = png(6)[:200]  # its header reads, its pixels do not
    bad = submit(client, ["bad"], [[truncated]])
    good = submit(client, ["good"], [[png(7)]])
    batch = worker.intake.next_batch()
    assert [p.taken.job_id for p in batch.jobs] == [good[0]]
    with pytest.raises(EncodeFailed, match="cannot be decoded, truncated or corrupt"):
        raise_for_error(client.wire.wait(*bad))
    assert worker.links.pixels.in_use == ONE_IMAGE  # the good job's alone
    worker.delivery.deliver(worker.compute.compute(batch))
    assert worker.links.pixels.in_use == 0
    assert_same(result(client, *good), baseline.encode(["good"], task="i2i", images=[[png(7)]]))


def test_a_stopping_worker_runs_the_jobs_waiting_for_room_and_gives_all_of_it_back(worker, client, baseline):
    jobs = [submit(client, [f"held {i}"], [[png(20 + i)]]) for i in range(3)]
    worker.intake.admit(worker.source.take(3, 60))  # one has room, two wait for it
    assert worker.links.pixels.in_use == ONE_IMAGE
    worker.links.stopping.set()
    intake = threading.Thread(target=worker.intake.run)  # what the intake thread does once the worker stops
    intake.start()
    batches = 0
    while (batch := worker.links.ready.get(timeout=60)) is not None:  # the compute thread's part
        worker.delivery.deliver(worker.compute.compute(batch))
        batches += 1
    intake.join(30)
    assert batches == 3 and worker.links.pixels.in_use == 0 and worker.links.pixels.peak == ONE_IMAGE
    for i, (job_id, deadline) in enumerate(jobs):
        assert_same(result(client, job_id, deadline), baseline.encode([f"held {i}"], task="i2i",
                                                                      images=[[png(20 + i)]]))
    with pytest.raises(queue.Empty):
        worker.links.ready.get_nowait()
