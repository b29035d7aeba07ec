"""Every fault stays with its own job: whatever sits in Redis is checked with the job it belongs to; a
malformed entry fails that job (or is dropped and logged when it has no job hash), never another job, and strands
none. A real Redis, a real worker object (threads not started), the tiny encoder."""

import time
import uuid

import msgpack
import pytest
import redis

from broker.client import EncoderClient
from broker.errors import EncodeFailed, InvalidRequest, PromptTooLong, ProtocolError
from broker.protocol import keys
from broker.protocol.enqueue import new_job_mapping
from broker.protocol.schemas import EncodeRequest, Handle
from broker.protocol.scripts import Scripts, enqueue_args
from broker.results import check_location, parse_result_entry, raise_for_error, read_blob, read_shm
from tests.helpers import write_config
from workers.config import PROMPT_CHARS_PER_TOKEN, EncoderWorkerConfig
from workers.worker import EncoderWorker


@pytest.fixture
def worker(baseline, tiny_dir, redis_server, tmp_path):
    queue = "poison-" + uuid.uuid4().hex[:8]
    cfg = write_config(str(tmp_path / "w.json"), model_dir=tiny_dir, backend="baseline", device="cpu",
                       redis_url=redis_server.url, queue=queue, shm_prefix="ebp" + uuid.uuid4().hex[:6],
                       cache_max_bytes=0, max_wait_ms=0, max_prompt_chars=2000)
    return EncoderWorker(EncoderWorkerConfig.from_json(cfg), baseline)


def raw_job(worker, request: dict, job_id: str | None = None) -> str:
    """Enqueues a job whose request is `request` as given, bypassing every check a client makes."""
    payload = msgpack.packb({"version": 1, "task": "t2i", **request}, use_bin_type=True)
    job_id, mapping = new_job_mapping(payload, worker.queue, job_timeout=30, result_ttl=30, failure_ttl=30,
                                      ttl=30, retries=1, job_id=job_id)
    Scripts(worker.connection).call("enqueue", *enqueue_args(job_id, mapping, worker.queue, 0, 30))
    return job_id


def outcome_of(worker, job_id: str):
    with EncoderClient(worker.config.redis_url, queue=worker.queue, timeout=10,
                       shm_prefix=worker.config.shm_prefix) as client:
        return client.wire.wait(job_id, time.time() + 10)


def run_through(worker) -> None:
    """What the worker's threads do with what is queued: one batch through every stage."""
    batch = worker.intake.next_batch()
    if batch is not None:
        worker.delivery.deliver(worker.compute.compute(batch))


def assert_served(worker, job_ids) -> None:
    """Each job succeeded, and its result reads back as a client reads it. Reading it also removes it: these jobs
    name no client host, so their results are blobs in the session's Redis, where a later test may count them."""
    for job_id in job_ids:
        outcome = outcome_of(worker, job_id)
        assert outcome.error is None, outcome.error
        handle = check_location(Handle.from_msgpack(raise_for_error(outcome)), job_id, worker.config.shm_prefix)
        if handle.transport == "shm":
            states = read_shm(handle, prefix=worker.config.shm_prefix)
        else:
            states = read_blob(worker.connection.getdel(handle.location), handle)
        assert len(states) == 1 and states[0].ndim == 2


def test_a_malformed_deadline_fails_its_own_job_not_the_batch(worker):
    """D4: a deadline that is a string or a list."""
    good = [raw_job(worker, {"prompts": [f"good {i}"]}) for i in range(3)]
    bad = [raw_job(worker, {"prompts": ["x"], "deadline": "soon"}),
           raw_job(worker, {"prompts": ["x"], "deadline": [1, 2]})]
    run_through(worker)
    for job_id in bad:
        with pytest.raises(EncodeFailed, match="deadline must be a number"):
            raise_for_error(outcome_of(worker, job_id))
    assert_served(worker, good)
    r = redis.Redis.from_url(worker.config.redis_url)
    assert all(r.hget(keys.job(j), "number_of_retries") is None for j in good)  # nobody paid a retry


@pytest.mark.parametrize("kind", ["string", "list"])
def test_an_id_whose_record_is_not_a_hash_is_dropped_and_strands_nothing(worker, kind):
    """D5: the take checks each key's type before it touches it; ids go nowhere but the started registry."""
    r = redis.Redis.from_url(worker.config.redis_url)
    q = keys.QueueKeys(worker.queue)
    good = [raw_job(worker, {"prompts": [f"good {i}"]}) for i in range(3)]
    odd = uuid.uuid4().hex
    (r.set if kind == "string" else r.rpush)(keys.job(odd), "not a job")
    r.rpush(q.queue, odd)
    good += [raw_job(worker, {"prompts": [f"good {i}"]}) for i in range(3, 6)]
    taken = worker.source.take(10, 60)
    assert sorted(t.job_id for t in taken) == sorted(good)
    assert r.llen(q.queue) == 0 and not r.keys(f"rq:intermediate:{worker.queue}")
    worker.intake.admit(taken)
    run_through(worker)
    assert_served(worker, good)
    assert r.type(keys.job(odd)) == kind.encode()  # left as it was: not ours to delete


def test_an_id_that_is_no_rq_job_id_fails_alone(worker):
    """D6: an id that is not UTF-8 (RQ's ids are letters, digits, '_' and '-')."""
    r = redis.Redis.from_url(worker.config.redis_url)
    q = keys.QueueKeys(worker.queue)
    good = [raw_job(worker, {"prompts": [f"good {i}"]}) for i in range(2)]
    bad = b"\xff\xfe-" + uuid.uuid4().hex.encode()
    r.hset(b"rq:job:" + bad, mapping={"status": "queued", "data": b"whatever"})
    r.rpush(q.queue, bad)
    good.append(raw_job(worker, {"prompts": ["good 2"]}))
    run_through(worker)
    assert_served(worker, good)
    assert r.hget(b"rq:job:" + bad, "status") == b"failed"
    assert r.zscore(q.failed, bad) is not None
    ((_, entry),) = r.xrange(b"rq:results:" + bad)
    assert "RQ's job ids" in parse_result_entry(entry).error


def test_malformed_timestamps_and_meta_do_not_fail_a_job(worker):
    r = redis.Redis.from_url(worker.config.redis_url)
    job_id = raw_job(worker, {"prompts": ["odd fields"]})
    r.hset(keys.job(job_id), mapping={"enqueued_at": b"\xff not a time", "meta": b"\xc1"})
    run_through(worker)
    assert_served(worker, [job_id])


def test_max_tokens_must_be_an_integer_not_a_bool():
    with pytest.raises(InvalidRequest, match="max_tokens must be a positive integer"):
        EncodeRequest(prompts=["x"], max_tokens=True).validate()
    assert EncodeRequest(prompts=["x"], max_tokens=1).validate().max_tokens == 1


def test_a_huge_prompt_is_refused_before_tokenizing_and_the_jobs_behind_it_run(worker):
    """D8: a prompt is bounded in characters (max_prompt_chars) before the tokenizer sees it."""
    huge = raw_job(worker, {"prompts": ["fox " * 250_000]})  # 1 MB
    behind = [raw_job(worker, {"prompts": [f"small {i}"]}) for i in range(2)]
    run_through(worker)
    with pytest.raises(EncodeFailed, match="1000000 characters, over max_prompt_chars 2000"):
        raise_for_error(outcome_of(worker, huge))
    assert_served(worker, behind)
    with pytest.raises(PromptTooLong, match="max_prompt_chars"):
        worker.intake.prepare(EncodeRequest(prompts=["ok", "y" * 2001]))


def test_max_prompt_chars_defaults_from_max_prompt_tokens():
    assert EncoderWorkerConfig(max_prompt_tokens=100).max_prompt_chars == 100 * PROMPT_CHARS_PER_TOKEN
    assert EncoderWorkerConfig(max_prompt_chars=7).max_prompt_chars == 7


def test_the_heartbeat_keeps_a_job_alive_from_its_take_to_its_record(worker, baseline):
    """D8: a job being tokenized (taken, not yet in a batch) is this worker's: housekeeping pushes its heartbeat
    deadline whatever the intake thread is doing, until its result is recorded."""
    r = redis.Redis.from_url(worker.config.redis_url)
    started = keys.QueueKeys(worker.queue).started
    job_id = raw_job(worker, {"prompts": ["held"]})
    taken = worker.intake.take(1)
    (_, first), = r.zrange(started, 0, -1, withscores=True)
    time.sleep(0.01)
    assert worker.keep_alive()
    (_, second), = r.zrange(started, 0, -1, withscores=True)
    assert second > first
    worker.intake.admit(taken)
    run_through(worker)
    assert_served(worker, [job_id])
    assert worker.keep_alive()
    assert r.zcard(started) == 0 and not r.smembers(keys.worker_executions(worker.name))


@pytest.mark.parametrize("entry", [{b"type": b"one"}, {b"type": b"1", b"return_value": b"%%"},
                                   {b"type": b"2", b"exc_string": b"bm90IHpsaWI="}])
def test_a_malformed_result_entry_is_a_protocol_error(entry):
    """What a client reads back from Redis is checked too: a clear ProtocolError, not whatever int(), base64 or
    zlib happen to raise."""
    with pytest.raises(ProtocolError, match="malformed"):
        parse_result_entry(entry)
