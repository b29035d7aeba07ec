"""Redis loses the jobs (restarted without its data, or emptied) while clients wait for them: every kind of client
notices and enqueues its request again, and gets its right result within its timeout; a job that therefore runs
twice is recorded once, and its second result removed. Real redis-server, real worker processes."""

import asyncio
import concurrent.futures
import os
import signal
import uuid

import pytest
import redis

from broker.client import EncoderClient
from broker.generation import GenerationClient
from broker.protocol import keys
from dit_workers.worker import checksum
from tests.helpers import assert_encoded, eventually, restart, shm_names, start_worker, wait_for_workers
from tests.test_http_front import T2I_DROP_IDX, T2I_TEMPLATE, FrontThread, call, close, decode_answer, lightx2v_payload
from tests.test_worker_delivery import client as delivery_client  # noqa: F401 (fixtures)
from tests.test_worker_delivery import worker  # noqa: F401

TIMEOUT = 60.0


def jobs_in_redis(url: str, queue: str = "encode") -> int:
    r = redis.Redis.from_url(url)
    return r.llen(keys.QueueKeys(queue).queue) + r.zcard(keys.QueueKeys(queue).started)


def lose_while_waiting(server, frozen, calls: list, how: str, queue: str = "encode", jobs: int = 0) -> list:
    """Runs `calls` (each in a thread of its own) while `frozen` worker processes are stopped, so that their jobs
    (`jobs`, default one a call) sit in Redis; then empties Redis (`how`: "restart", a kill -9 and a fresh one
    without persistence, or "flushall") and wakes the workers: the calls' results. A frozen worker's pending take
    still takes the first job (it runs in Redis), so only the others are surely lost: each test sends two."""
    for proc in frozen:
        os.kill(proc.pid, signal.SIGSTOP)
    pool = concurrent.futures.ThreadPoolExecutor(len(calls))
    try:
        futures = [pool.submit(call_) for call_ in calls]
        assert eventually(lambda: jobs_in_redis(server.url, queue) >= (jobs or len(calls))
                          or any(f.done() for f in futures),
                          timeout=30), "the jobs never reached Redis"
        assert not any(f.done() for f in futures), [f.result() for f in futures if f.done()]
        if how == "restart":
            restart(server)
        else:
            redis.Redis.from_url(server.url).flushall()
        assert jobs_in_redis(server.url, queue) == 0
    finally:
        for proc in frozen:
            os.kill(proc.pid, signal.SIGCONT)
    try:
        return [f.result(timeout=TIMEOUT + 30) for f in futures]
    finally:
        pool.shutdown()


@pytest.mark.parametrize("how", ["restart", "flushall"])
@pytest.mark.parametrize("kind", ["shm", "shm+doorbell", "blob"])
def test_a_sync_client_gets_its_result_when_redis_loses_its_job(workers, own_redis, baseline, kind, how):
    proc = workers.start()
    client = EncoderClient(own_redis.url, timeout=TIMEOUT, transport="blob" if kind == "blob" else "shm",
                           doorbell=kind == "shm+doorbell", shm_prefix=workers.prefix)
    prompts = [f"lost {kind} job {i}" for i in range(2)]
    got = lose_while_waiting(own_redis, [proc], [lambda p=p: client.encode([p])[0] for p in prompts], how)
    for prompt, states in zip(prompts, got):
        assert_encoded(states, prompt, baseline)
    client.close()
    assert eventually(lambda: shm_names(workers.prefix) == [], timeout=10)


@pytest.mark.parametrize("how", ["restart", "flushall"])
def test_aencode_gets_its_result_when_redis_loses_its_job(workers, own_redis, baseline, how):
    proc = workers.start()
    client = EncoderClient(own_redis.url, timeout=TIMEOUT, shm_prefix=workers.prefix)
    prompts = [f"lost async job {i}" for i in range(2)]

    async def both():
        return await asyncio.gather(*(client.aencode([p]) for p in prompts))

    (got,) = lose_while_waiting(own_redis, [proc], [lambda: asyncio.run(both())], how, jobs=len(prompts))
    for prompt, (states,) in zip(prompts, got):
        assert_encoded(states, prompt, baseline)
    assert eventually(lambda: shm_names(workers.prefix) == [], timeout=10)


def test_an_http_caller_gets_its_answer_when_redis_loses_its_job(workers, own_redis, baseline):
    proc = workers.start()
    prompts = [f"a lost http job {i}" for i in range(2)]
    with FrontThread(redis_url=own_redis.url, queue="encode", timeout=TIMEOUT,
                     worker_shm_prefix=workers.prefix) as front:
        answers = lose_while_waiting(
            own_redis, [proc], [lambda p=p: call(front.port, "POST", "/generate",
                                                 lightx2v_payload(T2I_TEMPLATE.format(p), use_shm=False))
                                for p in prompts],
            "restart")
    for prompt, (status, result, _) in zip(prompts, answers):
        assert status == 200, result
        close(decode_answer(result, use_shm=False)[T2I_DROP_IDX:], baseline.encode([prompt])[0])
    assert eventually(lambda: shm_names(workers.prefix) == [], timeout=10)


def test_a_generation_client_gets_its_image_when_redis_loses_its_job(workers, own_redis, tiny_dir, tmp_path,
                                                                      baseline):
    workers.start()
    dit, log = start_worker(tmp_path, "dit", "dit_workers", text_encoder_type="lightllm_service",
                            model_path=tiny_dir, redis_url=own_redis.url, queue="generate", device="cpu",
                            lightllm_config={"service_url": own_redis.url, "service_timeout": 30,
                                             "service_retry": 1, "use_shm": True, "shm_prefix": workers.prefix})
    try:
        wait_for_workers(own_redis.url, 1, dit, log, queue="generate")
        client = GenerationClient(own_redis.url, timeout=TIMEOUT, retries=1)
        prompts = [f"a lost lighthouse {i}" for i in range(2)]
        got = lose_while_waiting(own_redis, [dit], [lambda p=p: client.generate(p, width=64, height=64, steps=2)
                                                    for p in prompts], "restart", queue="generate")
    finally:
        os.kill(dit.pid, signal.SIGCONT)
        dit.terminate()
        dit.wait(30)
    for prompt, res in zip(prompts, got):
        want = baseline.encode([prompt, " "])
        assert res.embeds_shapes == [list(t.shape) for t in want]
        assert res.embeds_checksum == pytest.approx(checksum(want), rel=1e-5)
        assert res.png.startswith(b"\x89PNG")


@pytest.mark.parametrize("transport", ["shm", "blob"])
def test_a_job_run_twice_is_recorded_once_and_its_second_result_removed(worker, delivery_client,  # noqa: F811
                                                                         baseline, transport):
    """As when a client enqueued its job again while a worker still ran it: both runs deliver."""
    from broker.protocol.host import host_id
    from broker.protocol.schemas import EncodeRequest

    wire = delivery_client.wire
    deadline = wire.deadline()
    job_id = wire.submit(EncodeRequest(prompts=["run twice"], transport=transport, client_host=host_id(),
                                       deadline=deadline).validate().to_msgpack(), deadline)
    first = worker.compute.compute(worker.intake.next_batch())
    r = redis.Redis.from_url(worker.config.redis_url)
    r.rpush(keys.QueueKeys(worker.queue).queue, job_id)  # the same job, queued again
    second = worker.compute.compute(worker.intake.next_batch())
    assert [p.taken.job_id for p in second.batch.jobs] == [job_id]
    worker.delivery.deliver(first)
    worker.delivery.deliver(second)
    assert r.xlen(keys.results(job_id)) == 1  # one result: the first run's
    assert r.hget(keys.job(job_id), "status") == b"finished"
    assert r.zcard(keys.QueueKeys(worker.queue).started) == 0
    stats = r.hgetall(keys.QueueKeys(worker.queue).stats(worker.name))
    assert int(stats[b"duplicate_results"]) == 1
    if transport == "shm":
        assert len(shm_names(worker.config.shm_prefix)) == 1  # the second run's segment is unlinked
    else:
        assert len(r.keys(keys.BLOB_PREFIX + "*")) == 1  # so is its blob
    outcome = wire.wait(job_id, deadline)
    from broker.protocol.schemas import Handle
    from broker.results import raise_for_error, read_blob, read_shm

    handle = Handle.from_msgpack(raise_for_error(outcome))
    states = read_shm(handle, prefix=worker.config.shm_prefix) if transport == "shm" else read_blob(wire.getdel(handle.location), handle)
    assert_encoded(states[0], "run twice", baseline)
    assert shm_names(worker.config.shm_prefix) == [] and r.keys(keys.BLOB_PREFIX + "*") == []


def test_a_job_enqueued_again_is_not_pushed_once_redis_knows_it(own_redis):
    """The client's second enqueue is conditional: a worker that recorded the job meanwhile wins."""
    from broker.protocol.queues import ENCODE_FUNCTION
    from broker.rq_wire import JobWire

    wire = JobWire(own_redis.url, "again-" + uuid.uuid4().hex[:6], ENCODE_FUNCTION, timeout=30, retries=1)
    deadline = wire.deadline()
    job_id = wire.submit(b"payload", deadline)
    r = redis.Redis.from_url(own_redis.url)
    queue = keys.QueueKeys(wire.queue).queue
    assert wire.scripts.call("enqueue", *wire._again(job_id, [0, 0, 0])) == 0  # its hash is there
    r.delete(keys.job(job_id), queue)
    r.xadd(keys.results(job_id), {"type": 1})
    assert wire.scripts.call("enqueue", *wire._again(job_id, [0, 0, 0])) == 0  # its result is there
    r.delete(keys.results(job_id))
    assert wire.scripts.call("enqueue", *wire._again(job_id, [0, 0, 0])) == 1  # gone: pushed, same id
    assert r.lrange(queue, 0, -1) == [job_id.encode()]
    assert wire._again(job_id, [0, 0, 1]) is None  # RECOVER says Redis knows it
    wire.close()
