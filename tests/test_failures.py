"""What breaks in production, with real processes and a real Redis: a worker killed mid-batch, a client that
vanishes, Redis restarting, a tiny /dev/shm budget, overload, and the stats that show it all."""

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis

from broker.client import EncoderClient
from broker.errors import BrokerUnavailable, EncodeFailed, Overloaded
from broker.protocol.host import host_id
from broker.protocol.queues import ENCODE_FUNCTION
from broker.protocol.schemas import EncodeRequest, Handle
from broker.rq_wire import JobWire
from tests.helpers import REPO, eventually, restart, shm_names
from workers.job_source import JobSource


def long_prompts(n, words=250):
    return [f"{i} " + "fox " * words for i in range(n)]


def submit(url, prompts, queue="encode", timeout=60, retries=1, transport="shm"):
    wire = JobWire(url, queue, ENCODE_FUNCTION, timeout=timeout, retries=retries)
    deadline = wire.deadline()
    req = EncodeRequest(prompts=prompts, transport=transport, client_host=host_id(), deadline=deadline)
    return wire, wire.submit(req.to_msgpack(), deadline), deadline


def kill_mid_batch(url, proc, queue="encode"):
    r = redis.Redis.from_url(url)
    assert eventually(lambda: r.zcard(f"rq:wip:{queue}") > 0, timeout=30, interval=0.002), "job never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_worker_jobs_are_retried_by_another(workers, baseline):
    big = dict(max_prompt_tokens=400)
    victim = workers.start(**big)
    prompts = long_prompts(8)
    wire, job_id, deadline = submit(workers.url, prompts, retries=1)
    kill_mid_batch(workers.url, victim)
    workers.start(**big)  # the survivor finds the abandoned job and runs it again
    handle = Handle.from_msgpack(wire.wait(job_id, deadline).value)
    assert handle.shapes[0][0] == len(baseline.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]) + 5
    r = wire.redis
    assert r.hget(f"rq:job:{job_id}", "status") == b"finished"
    assert int(r.hget(f"rq:job:{job_id}", "number_of_retries")) == 1


def test_killed_worker_job_without_retries_fails_clearly_before_the_timeout(workers):
    victim = workers.start(max_prompt_tokens=400)
    wire, job_id, deadline = submit(workers.url, long_prompts(8), retries=0, timeout=30)
    kill_mid_batch(workers.url, victim)
    # No other worker: the waiting client itself notices the dead worker (heartbeat ttl 2 s).
    outcome = wire.wait(job_id, deadline)
    assert outcome.value is None and "AbandonedJob" in outcome.error
    assert wire.redis.zscore("rq:failed:encode", job_id) is not None


def test_vanished_client_leaves_no_segment_beyond_its_expiry(workers, own_redis):
    workers.start(result_ttl_s=2)
    code = (
        "import time; from broker.rq_wire import JobWire; from broker.protocol.queues import ENCODE_FUNCTION\n"
        "from broker.protocol.schemas import EncodeRequest; from broker.protocol.host import host_id\n"
        f"w = JobWire('{own_redis.url}', 'encode', ENCODE_FUNCTION, 30, 0); d = w.deadline()\n"
        "w.submit(EncodeRequest(prompts=['orphan'], client_host=host_id(), deadline=d).to_msgpack(), d)\n"
        "print('submitted', flush=True)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)  # exits without reading
    r = redis.Redis.from_url(own_redis.url)
    assert eventually(lambda: r.zcard("rq:finished:encode") == 1)
    assert shm_names(workers.prefix), "the worker should have written a segment for the vanished client"
    assert eventually(lambda: shm_names(workers.prefix) == [], timeout=15)


def test_redis_restart_clients_get_a_clear_error_and_workers_reconnect(workers, own_redis, baseline):
    workers.start()
    client = EncoderClient(own_redis.url, timeout=5, retries=1, shm_prefix=workers.prefix)
    assert client.encode(["before"])[0].shape == baseline.encode(["before"])[0].shape
    own_redis.stop()
    with pytest.raises(BrokerUnavailable, match="cannot reach Redis"):  # down for longer than the timeout
        client.encode(["while down"])
    with pytest.raises(BrokerUnavailable, match="cannot reach Redis"):  # retries=0: at the first refusal
        EncoderClient(own_redis.url, timeout=60, retries=0).encode(["no retries"])
    own_redis.start()  # same port, empty (no persistence)

    def served():
        try:
            return client.encode(["after"])[0].shape == baseline.encode(["after"])[0].shape
        except (BrokerUnavailable, EncodeFailed, TimeoutError):
            return False
    assert eventually(served, timeout=40, interval=0.5)
    r = redis.Redis.from_url(own_redis.url)
    assert eventually(lambda: r.scard("rq:workers:encode") == 1, timeout=10)  # registered again


def test_a_request_sent_while_redis_is_down_is_served_when_it_is_back(workers, own_redis, baseline):
    """A restart shorter than the client's timeout costs its requests time, not an error (the soak's Redis
    restarts failed 2 requests a client with a fixed count of retries)."""
    workers.start()
    client = EncoderClient(own_redis.url, timeout=60, retries=3, shm_prefix=workers.prefix)
    client.encode(["warm"])
    own_redis.stop()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.encode, ["sent while Redis is down"])
        time.sleep(2.0)  # several refused attempts
        assert not pending.done()
        own_redis.start()
        got = pending.result(timeout=60)[0]
    want = baseline.encode(["sent while Redis is down"])[0]
    assert got.shape == want.shape
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-3


def test_clients_and_workers_ride_out_a_redis_restart_between_requests(workers, own_redis, baseline):
    """D1, D2: the first request after Redis comes back is served, whatever connections went stale (the
    doorbell's raced XREAD, the pool's, the asyncio client's, the worker's wait), within the clients' retries."""
    workers.start()
    clients = [EncoderClient(own_redis.url, timeout=30, retries=3, shm_prefix=workers.prefix, **kw)
               for kw in ({}, {"doorbell": False}, {"transport": "blob"})]
    for c in clients:
        c.encode(["warm"])
    loop = asyncio.new_event_loop()
    loop.run_until_complete(clients[0].aencode(["warm"]))
    restart(own_redis)
    want = baseline.encode(["after the restart"])[0].shape
    for c in clients:
        assert c.encode(["after the restart"])[0].shape == want
    assert loop.run_until_complete(clients[0].aencode(["after the restart"]))[0].shape == want
    loop.close()
    assert eventually(lambda: redis.Redis.from_url(own_redis.url).scard("rq:workers:encode") == 1, timeout=10)
    assert shm_names(workers.prefix) == []


def test_a_workers_first_take_after_a_redis_restart_takes_the_job(own_redis):
    """D2: no stale connection is kept for the wait (it is one pipelined round trip on the pool's connections):
    the take right after Redis comes back takes the job, no error, no back-off."""
    r = redis.Redis.from_url(own_redis.url)
    source = JobSource(r, "restarted", "w-" + uuid.uuid4().hex[:6], max_payload_bytes=1 << 20)
    assert source.wait_and_take(4, 60, 0.1) == []
    restart(own_redis)
    wire, job_id, _ = submit(own_redis.url, ["taken"], queue="restarted")
    assert [t.job_id for t in source.wait_and_take(4, 60, 1.0)] == [job_id]


def test_tiny_shm_budget_falls_back_to_blob(workers, baseline):
    workers.start(shm_max_bytes=16)
    wire, job_id, deadline = submit(workers.url, ["too big for the budget", "b"])
    handle = Handle.from_msgpack(wire.wait(job_id, deadline).value)
    assert handle.transport == "blob"
    # the client reads whichever transport came back
    client = EncoderClient(workers.url, timeout=30, shm_prefix=workers.prefix)
    got = client.encode(["too big for the budget"])
    assert got[0].shape == baseline.encode(["too big for the budget"])[0].shape
    assert shm_names(workers.prefix) == []


def test_overload_is_refused_at_once(workers):
    proc = workers.start(queue="busy", max_queue_depth=2)
    os.kill(proc.pid, signal.SIGSTOP)  # the queue fills while its worker is frozen
    accepted = 0
    try:
        # A frozen worker's pending wake-up wait (and the take behind it) may still be served: fill until refused.
        with pytest.raises(Overloaded, match="full"):
            for _ in range(4):
                submit(workers.url, ["queued"], queue="busy")
                accepted += 1
        r = redis.Redis.from_url(workers.url)
        assert r.llen("rq:queue:busy") == 2
        with pytest.raises(Overloaded, match="full"):
            EncoderClient(workers.url, queue="busy", timeout=30).encode(["one too many"])
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert eventually(lambda: r.zcard("rq:finished:busy") == accepted)  # the accepted ones still run


def test_stats_show_batches_cache_and_workers(workers):
    workers.start()
    client = EncoderClient(workers.url, timeout=30, shm_prefix=workers.prefix)
    client.encode([" ", "a fox", " "])  # duplicates in one job: computed once
    client.encode([" "])  # across clients/jobs: a cache hit
    r = redis.Redis.from_url(workers.url)
    assert eventually(lambda: r.llen("eb:latency:encode") == 2)  # stats are written just after the results
    out = subprocess.run([sys.executable, "-m", "broker", "stats", "--redis-url", workers.url, "--json"],
                         cwd=REPO, capture_output=True, text=True, check=True, timeout=60)
    s = json.loads(out.stdout)
    assert s["depth"] == 0 and s["finished"] == 2
    assert len(s["workers"]) == 1 and s["workers"][0]["state"] in ("idle", "busy")
    assert (s["workers"][0]["device"], s["workers"][0]["dtype"]) == ("cpu", "float32")  # what it holds
    assert s["totals"]["jobs"] == 2 and s["totals"]["cache_hits"] >= 1
    assert s["totals"]["computed_tokens"] < s["totals"]["tokens"]
    assert sum(s["batch_histogram"].values()) == s["totals"]["batches"]
    assert s["latency_ms"]["samples"] == 2 and s["latency_ms"]["p50"] > 0
    text = subprocess.run([sys.executable, "-m", "broker", "stats", "--redis-url", workers.url],
                          cwd=REPO, capture_output=True, text=True, check=True, timeout=60).stdout
    assert "cache hit rate" in text and "workers (1)" in text and " on cpu, float32 " in text
