"""Prompts in, hidden states out, through a real Redis, a real worker process and real shared memory."""

import asyncio
import random
import time
import zlib
from datetime import datetime, timezone

import msgpack
import pytest
import redis
import torch

from broker.client import EncoderClient
from broker.errors import BrokerUnavailable, EncodeFailed, InvalidRequest
from broker.protocol.enqueue import new_job_mapping
from broker.protocol.queues import ENCODE_FUNCTION
from broker.protocol.schemas import EncodeRequest
from broker.protocol.scripts import RQ_LIB, Scripts, enqueue_args
from broker.rq_wire import JobWire
from tests.conftest import TEST_MAX_PROMPT_TOKENS
from tests.helpers import eventually, free_port, shm_names, start_worker, stop_process, wait_for_workers, write_config
from workers.templates import T2I

RQ_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # RQ's dates, as its job hashes hold them


def prompt_of_length(tokenizer, n_out: int) -> str:
    """A user prompt whose encoder output is exactly n_out tokens (user tokens + the 5-token suffix)."""
    words = ["fox"] + [" fox"] * (n_out - 6)
    text = "".join(words)
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n_out - 5
    return text


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_broker_equals_in_process_baseline(client, baseline, encoder_worker):
    long = prompt_of_length(baseline.tokenizer, TEST_MAX_PROMPT_TOKENS)
    prompts = ["", "a red fox in snow", "ünïcödé and emoji 🦊🎨 日本語", long]
    got = client.encode(prompts)
    assert [g.shape[0] for g in got][-1] == TEST_MAX_PROMPT_TOKENS
    assert_same(got, [baseline.encode([p])[0] for p in prompts])
    assert shm_names(encoder_worker["prefix"]) == []  # the client unlinked the segment after reading


def test_over_the_limit_fails_that_job_clearly(client, baseline):
    too_long = prompt_of_length(baseline.tokenizer, TEST_MAX_PROMPT_TOKENS + 1)
    with pytest.raises(EncodeFailed, match=f"over the limit of {TEST_MAX_PROMPT_TOKENS}"):
        client.encode(["fine", too_long])
    assert_same(client.encode(["fine"]), baseline.encode(["fine"]))


def test_blob_transport_gives_the_same_tensors(encoder_worker, baseline):
    prompts = ["a blob for a remote host", "second"]
    with EncoderClient(encoder_worker["url"], transport="blob", timeout=30) as blob_client:
        got = blob_client.encode(prompts)
        assert blob_client.wire.redis.keys("eb:blob:*") == []  # read with GETDEL: nothing left behind
    assert_same(got, baseline.encode(prompts))
    assert shm_names(encoder_worker["prefix"]) == []


def test_zero_copy_views_survive_unlink(encoder_worker, baseline):
    with EncoderClient(encoder_worker["url"], timeout=30, copy=False, shm_prefix=encoder_worker["prefix"]) as c:
        got = c.encode(["zero copy"])
    assert shm_names(encoder_worker["prefix"]) == []
    assert_same([got[0].clone()], baseline.encode(["zero copy"]))


def test_32_concurrent_aencode_calls(encoder_worker, baseline):
    prompts = [f"prompt number {i}: " + "red " * (i % 7) + "fox" for i in range(32)]

    async def run():
        c = EncoderClient(encoder_worker["url"], timeout=60, shm_prefix=encoder_worker["prefix"])
        try:
            return await asyncio.gather(*(c.aencode([p]) for p in prompts))
        finally:
            await c.aclose()

    results = asyncio.run(run())
    for p, (got,) in zip(prompts, results):
        assert_same([got], baseline.encode([p]))
    assert shm_names(encoder_worker["prefix"]) == []


def test_a_client_works_across_asyncio_run_calls(encoder_worker, baseline):
    """D10: each asyncio.run() is a new event loop; the client's asyncio connections belong to the loop that made
    them, so each loop gets its own, and no call leaves a segment behind."""
    with EncoderClient(encoder_worker["url"], timeout=30, shm_prefix=encoder_worker["prefix"]) as c:
        for i in range(3):
            (got,) = asyncio.run(c.aencode([f"loop {i}"]))
            assert_same([got], baseline.encode([f"loop {i}"]))
    assert shm_names(encoder_worker["prefix"]) == []


def raw_job(url: str, payload, function: str = ENCODE_FUNCTION, data: bytes | None = None) -> str:
    """Writes a job by hand, bypassing the client's checks, and returns its id."""
    job_id, mapping = new_job_mapping(payload, "encode", function=function, job_timeout=30, result_ttl=30,
                                      failure_ttl=30, ttl=30, retries=0)
    if data is not None:
        mapping["data"] = data
    Scripts(redis.Redis.from_url(url)).call("enqueue", *enqueue_args(job_id, mapping, "encode", 0, 30))
    return job_id


def zlib_bomb(inflated: int) -> bytes:
    """zlib data of a job record that inflates to `inflated` bytes (zeros after a msgpack array header), made
    a MiB at a time so the test itself never holds it inflated."""
    z = zlib.compressobj(9)
    parts = [z.compress(b"\x94")]
    parts += [z.compress(bytes(1 << 20)) for _ in range(inflated >> 20)]
    return b"".join(parts) + z.flush()


def request(**kw) -> bytes:
    return msgpack.packb({"version": 1, "prompts": ["x"], "task": "t2i", **kw}, use_bin_type=True)


@pytest.mark.parametrize("payload, data, function, message", [
    (request(prompts=["ok", 7]), None, ENCODE_FUNCTION, "prompt 1 is a int, not a string"),
    (request(prompts=[]), None, ENCODE_FUNCTION, "prompts is empty"),
    (request(task="t2v"), None, ENCODE_FUNCTION, "unknown task 't2v'"),
    (request(), None, "os.system", f"refused: this worker runs only {ENCODE_FUNCTION}, not 'os.system'"),
    (request(), zlib.compress(b"\xc1 not msgpack"), ENCODE_FUNCTION, "job data is not msgpack"),
    (b"\xc1\xc1 not msgpack either", None, ENCODE_FUNCTION, "not valid msgpack"),
    (request(version=99), None, ENCODE_FUNCTION, "schema version 99"),
    (request(), zlib_bomb(64 << 20), ENCODE_FUNCTION, "job data refused unread"),  # past max_payload_bytes (16 MiB)
])
def test_bad_jobs_fail_clearly_and_the_worker_keeps_serving(client, baseline, encoder_worker, payload, data,
                                                             function, message):
    job_id = raw_job(encoder_worker["url"], payload, function=function, data=data)
    wire = JobWire(encoder_worker["url"], "encode", ENCODE_FUNCTION, timeout=30, retries=0)
    outcome = wire.wait(job_id, time.time() + 30)
    assert outcome.value is None and message in outcome.error
    r = wire.redis
    assert r.hget(f"rq:job:{job_id}", "status") == b"failed"
    assert r.zscore("rq:failed:encode", job_id) is not None  # visible in RQ's failed registry
    assert_same(client.encode(["still serving"]), baseline.encode(["still serving"]))
    assert encoder_worker["proc"].poll() is None


@pytest.mark.parametrize("prompts, task, says", [("not a list", "t2i", "list of strings"),
                                                   ([b"bytes"], "t2i", "prompt 0 is a bytes"),
                                                   ([], "t2i", "empty"), (["x"], "t3i", "unknown task")])
def test_client_refuses_bad_input_before_sending(client, prompts, task, says):
    with pytest.raises(InvalidRequest, match=says):
        client.encode(prompts, task=task)


def test_finished_jobs_are_in_rqs_registries(client, encoder_worker):
    client.encode(["registry check"])
    r = redis.Redis.from_url(encoder_worker["url"])
    # a result rung to its client (broker.protocol.doorbell) is recorded a moment after the client has it
    assert eventually(lambda: r.zcard("rq:wip:encode") == 0)  # nothing left marked started
    assert r.zcard("rq:finished:encode") >= 1
    assert r.llen("rq:intermediate:encode") == 0


def test_unreachable_redis_is_a_clear_error_within_the_timeout():
    c = EncoderClient(f"redis://127.0.0.1:{free_port()}/0", timeout=2.0, retries=3)
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="cannot reach Redis"):
        c.encode(["x"])
    assert time.monotonic() - t0 <= 2.0 + 1.0  # the contract: the error comes within the client's timeout


def test_from_seed_config(tmp_path, encoder_worker, baseline):
    cfg = write_config(str(tmp_path / "dit.json"), text_encoder_type="lightllm_service",
                       lightllm_config={"service_url": encoder_worker["url"], "service_timeout": 20,
                                        "service_retry": 1, "use_shm": False, "shm_prefix": "ebseed"})
    c = EncoderClient.from_config(cfg)
    assert (c.wire.timeout, c.wire.retries, c.transport, c.shm_prefix) == (20.0, 1, "blob", "ebseed")
    assert_same(c.encode(["from config"]), baseline.encode(["from config"]))
    with pytest.raises(ValueError, match="text_encoder_type"):
        EncoderClient.from_config(write_config(str(tmp_path / "bad.json"), text_encoder_type="baseline"))


def test_request_schema_round_trip():
    r = EncodeRequest(prompts=["a", "b"], task="t2i", transport="blob", client_host="h", deadline=1.5)
    assert EncodeRequest.from_msgpack(r.to_msgpack()) == r


def test_raw_inputs_return_every_token(client, baseline):
    templated = T2I.format("a raw templated input")
    (got,) = client.encode([templated], raw=True)
    (want,) = baseline.encode_tokens(baseline.tokenize([templated], raw=True))
    (cut,) = baseline.encode(["a raw templated input"])
    assert got.shape[0] == cut.shape[0] + T2I.drop_idx
    assert_same([got], [want])
    torch.testing.assert_close(got[T2I.drop_idx:], cut, rtol=1e-5, atol=1e-5)


def test_kernel_backend_worker_serves_the_same_states(tiny_dir, redis_server, tmp_path, baseline):
    """The worker with our own forward (torch references on the CPU) through the broker, one packed copy."""
    before = redis.Redis.from_url(redis_server.url).scard("rq:workers")
    proc, log = start_worker(tmp_path, "kernel", model_dir=tiny_dir, backend="kernel", device="cpu",
                             redis_url=redis_server.url, queue="encode-kernel",
                             max_prompt_tokens=TEST_MAX_PROMPT_TOKENS)
    try:
        wait_for_workers(redis_server.url, before + 1, proc, log)
        prompts = ["a kernel-served fox", "", " ", "ünïcödé 🦊", "a kernel-served fox"]
        with EncoderClient(redis_server.url, queue="encode-kernel", timeout=60) as c:
            got = c.encode(prompts)
        want = baseline.encode(prompts)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert (g - w).norm() / w.norm() < 1e-4
    finally:
        stop_process(proc)


def test_take_reads_redis_clock_in_rqs_format(redis_server):
    """The take script stamps jobs with Redis's clock (it may run long after the worker sent it, pipelined
    behind a blocking wait): its date arithmetic, checked against Python's at random instants."""
    r = redis.Redis.from_url(redis_server.url)
    fixed = RQ_LIB.replace("local t = redis.call('TIME')", "local t = {ARGV[1], ARGV[2]}")
    instants = [0, 951782400, 951868800, 1709164800, 4102444799] + [random.randrange(0, 4102444800)
                                                                      for _ in range(300)]
    for s in instants:
        us = random.randrange(0, 10**6)
        got = r.eval(fixed + "local _, text = rq_now() return text", 0, s, us).decode()
        want = datetime.fromtimestamp(s, timezone.utc).replace(microsecond=us).strftime(RQ_TIME_FORMAT)
        assert got == want, s
    before = time.time()
    text = r.eval(RQ_LIB + "local _, text = rq_now() return text", 0).decode()
    stamped = datetime.strptime(text, RQ_TIME_FORMAT).replace(tzinfo=timezone.utc).timestamp()
    assert before - 1 <= stamped <= time.time() + 1


def test_jobs_are_started_after_enqueue_and_leave_no_wake_ups(client, encoder_worker):
    r = redis.Redis.from_url(encoder_worker["url"])
    wire = client.wire
    job_id = wire.submit(EncodeRequest(prompts=["stamps"], transport="blob").to_msgpack(), wire.deadline())
    assert wire.wait(job_id, wire.deadline()).error is None
    fields = r.hmget(f"rq:job:{job_id}", "enqueued_at", "started_at", "ended_at")
    enqueued, started, ended = (datetime.strptime(f.decode(), RQ_TIME_FORMAT) for f in fields)
    assert enqueued <= started <= ended
    assert r.llen("eb:wake:encode") == 0  # the take emptied the wake-up list with the queue


def test_a_job_pushed_without_a_wake_up_is_still_taken(encoder_worker, baseline):
    """Another enqueuer (RQ's own Queue.enqueue, say) pushes ids without our wake-up token: an idle worker
    still takes the job when its blocking wait times out (1 s)."""
    url = encoder_worker["url"]
    payload = EncodeRequest(prompts=["no wake-up"], transport="blob").to_msgpack()
    job_id, mapping = new_job_mapping(payload, "encode", job_timeout=30, result_ttl=30, failure_ttl=30, ttl=30,
                                      retries=0)
    r = redis.Redis.from_url(url)
    r.hset(f"rq:job:{job_id}", mapping=mapping)
    r.rpush("rq:queue:encode", job_id)
    wire = JobWire(url, "encode", ENCODE_FUNCTION, timeout=30, retries=0)
    outcome = wire.wait(job_id, time.time() + 30)
    assert outcome.error is None and outcome.value is not None
