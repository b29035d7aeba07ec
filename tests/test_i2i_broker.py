"""i2i through a real Redis and real worker processes: equal to in process over shm and blobs, bad images fail
their own job only, a CFG pair's images run through the vision tower once (the kernel worker's stats)."""

import asyncio
import time

import msgpack
import pytest
import redis

from broker.client import EncoderClient
from broker.errors import EncodeFailed, InvalidRequest
from broker.protocol.queues import ENCODE_FUNCTION
from broker.rq_wire import JobWire
from tests.helpers import eventually, start_worker, stop_process, wait_for_workers
from tests.test_broker_e2e import assert_same, raw_job
from tests.test_i2i_encoder import BAD, SQUARE, TALL, WIDE, noise_png, rel_l2

PAIR = ["make the sky purple", " "]


@pytest.mark.parametrize("transport", ["shm", "blob"])
def test_cfg_pair_through_the_broker_equals_in_process(encoder_worker, baseline, transport):
    with EncoderClient(encoder_worker["url"], timeout=60, transport=transport,
                       shm_prefix=encoder_worker["prefix"]) as c:
        got = c.encode(PAIR, task="i2i", images=[WIDE, TALL])  # one job: both prompts, the same two images
        per_prompt = c.encode(["x", "y"], task="i2i", images=[[SQUARE], [TALL, WIDE, SQUARE]])
    assert_same(got, baseline.encode(PAIR, task="i2i", images=[[WIDE, TALL], [WIDE, TALL]]))
    assert_same(per_prompt, baseline.encode(["x", "y"], task="i2i", images=[[SQUARE], [TALL, WIDE, SQUARE]]))


def test_aencode_i2i_jobs_batch_with_t2i_jobs(encoder_worker, baseline):
    async def run():
        c = EncoderClient(encoder_worker["url"], timeout=60, shm_prefix=encoder_worker["prefix"])
        try:
            return await asyncio.gather(c.aencode(PAIR, task="i2i", images=[WIDE]), c.aencode(["plain t2i"]),
                                        c.aencode(PAIR, task="i2i", images=[TALL]))
        finally:
            await c.aclose()

    a, t, b = asyncio.run(run())
    assert_same(a, baseline.encode(PAIR, task="i2i", images=[WIDE]))
    assert_same(t, baseline.encode(["plain t2i"]))
    assert_same(b, baseline.encode(PAIR, task="i2i", images=[TALL]))


def test_bad_images_fail_their_own_job_and_the_worker_keeps_serving(encoder_worker, baseline):
    too_many = [noise_png(64, 64, s) for s in range(5)]

    async def run():
        c = EncoderClient(encoder_worker["url"], timeout=60, shm_prefix=encoder_worker["prefix"])
        try:
            calls = [c.aencode(["x"], task="i2i", images=[blob]) for blob, _ in BAD]
            calls += [c.aencode(["x"], task="i2i", images=too_many), c.aencode(PAIR, task="i2i", images=[WIDE])]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await c.aclose()

    *bad, many, good = asyncio.run(run())
    for (_, message), err in zip(BAD, bad):
        if message == "is empty":  # refused by the client before sending (validate)
            assert isinstance(err, InvalidRequest) and "empty bytes" in str(err)
            continue
        assert isinstance(err, EncodeFailed) and "InvalidRequest" in str(err) and message in str(err), err
        assert "prompt 0 image 0" in str(err)
    assert isinstance(many, EncodeFailed) and "over max_images_per_job 4" in str(many)
    assert_same(good, baseline.encode(PAIR, task="i2i", images=[WIDE]))
    assert encoder_worker["proc"].poll() is None


@pytest.mark.parametrize("payload, message", [
    (dict(task="t2i", images=[[WIDE]]), "'t2i' takes no images"),
    (dict(task="i2i"), "needs one list of images per prompt"),
    (dict(task="i2i", images=[WIDE]), "images[0] is a bytes, not a list"),
])
def test_malformed_image_jobs_fail_clearly_on_the_worker(encoder_worker, baseline, payload, message):
    """Written by hand (the client refuses these before sending): the worker refuses them too."""
    job = msgpack.packb({"version": 1, "prompts": ["x"], **payload}, use_bin_type=True)
    job_id = raw_job(encoder_worker["url"], job)
    wire = JobWire(encoder_worker["url"], "encode", ENCODE_FUNCTION, timeout=30, retries=0)
    outcome = wire.wait(job_id, time.time() + 30)
    assert outcome.value is None and message in outcome.error
    with EncoderClient(encoder_worker["url"], timeout=60, shm_prefix=encoder_worker["prefix"]) as c:
        assert_same(c.encode(["x"], task="i2i", images=[SQUARE]), baseline.encode(["x"], task="i2i", images=[SQUARE]))


@pytest.fixture(scope="module")
def kernel_worker(tiny_dir, redis_server, tmp_path_factory):
    """A kernel-backend worker (torch references on the CPU) on its own queue."""
    d = tmp_path_factory.mktemp("i2i-kernel")
    before = redis.Redis.from_url(redis_server.url).scard("rq:workers")
    proc, log = start_worker(d, "kernel", model_dir=tiny_dir, backend="kernel", device="cpu",
                             redis_url=redis_server.url, queue="encode-i2i", max_images_per_job=3)
    wait_for_workers(redis_server.url, before + 1, proc, log)
    yield {"url": redis_server.url, "proc": proc, "log": log}
    stop_process(proc)


def vision_stats(url: str, want: tuple[int, int]) -> tuple[int, int]:
    """The worker's (images computed, images reused) once they reach `want` or after a bounded wait: the stats
    are written just after the results the client already has."""
    r = redis.Redis.from_url(url)

    def now() -> tuple[int, int]:
        keys = r.keys("eb:stats:encode-i2i:*")
        s = r.hgetall(keys[0]) if keys else {}
        return int(float(s.get(b"vision_images_computed", 0))), int(float(s.get(b"vision_images_reused", 0)))

    eventually(lambda: now() == want, timeout=10)
    return now()


def test_kernel_worker_runs_a_cfg_pairs_images_once(kernel_worker, baseline):
    with EncoderClient(kernel_worker["url"], queue="encode-i2i", timeout=60) as c:
        got = c.encode(PAIR, task="i2i", images=[WIDE, TALL])
        assert vision_stats(kernel_worker["url"], (2, 2)) == (2, 2)  # two images computed once, reused by the negative
        again = c.encode(["make the sky green", " "], task="i2i", images=[TALL, WIDE])
        assert vision_stats(kernel_worker["url"], (2, 6)) == (2, 6)  # every image from the feature cache
        with pytest.raises(EncodeFailed, match="4 distinct images in one job, over max_images_per_job 3"):
            c.encode(["x", "y"], task="i2i", images=[[WIDE, TALL], [SQUARE, noise_png(64, 64, 7)]])
        one = c.encode(["x", "y"], task="i2i", images=[[SQUARE], [SQUARE]])
    want = baseline.encode(PAIR, task="i2i", images=[WIDE, TALL])
    want += baseline.encode(["make the sky green", " "], task="i2i", images=[TALL, WIDE])
    for g, w in zip(got + again, want, strict=True):
        assert g.shape == w.shape and rel_l2(g, w) < 1e-4
    assert [g.shape for g in one] == [w.shape for w in baseline.encode(["x", "y"], task="i2i", images=[SQUARE])]
    assert kernel_worker["proc"].poll() is None
