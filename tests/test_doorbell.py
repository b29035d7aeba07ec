"""The doorbell shortcut (broker.doorbell): a worker on the client's host hands a shm result's handle straight to
the waiting client; Redis stays the source of truth. Real sockets, a real Redis, the real worker process."""

import base64
import multiprocessing as mp
import os
import queue as queue_module
import socket
import threading
import time
import uuid

import pytest
import redis
import torch

from broker.client import EncoderClient
from broker.doorbell import MAX_RUNG_REQUEST_BYTES, Doorbell, Ring, Ringer, local_bells
from broker.enqueue import hand_on_key, queue_key, wake_key
from broker.errors import InvalidRequest
from broker.host import host_id
from broker.queues import ENCODE_FUNCTION
from broker.results import read_shm
from broker.rq_wire import JobWire
from broker.schemas import EncodeRequest, Handle
from broker.serializer import MsgpackSerializer
from shm import SHM_DIR, write_segment
from tests.helpers import eventually
from workers.job_source import JobSource

def shm_handle(name: str, nbytes: int = 8) -> bytes:
    return Handle(transport="shm", location=name, dtype="bfloat16", shapes=[[1, nbytes // 2]], offsets=[0],
                  nbytes=nbytes, expires_at=time.time() + 30).to_msgpack()


def segment_exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name.lstrip("/")))


def assert_encoded(outcome, via: str, prompt: str, baseline) -> None:
    """`outcome` came `via` where expected and its segment holds `prompt`'s states."""
    assert outcome.via == via and outcome.error is None
    got = read_shm(Handle.from_msgpack(outcome.value))[0]
    assert torch.equal(got, baseline.encode([prompt])[0].to(got.dtype))


def submit(client: EncoderClient, prompt: str, bell: str = "") -> tuple[str, float]:
    deadline = client.wire.deadline()
    req = EncodeRequest(prompts=[prompt], transport="shm", client_host=host_id(), deadline=deadline, bell=bell)
    return client.wire.submit(req.validate().to_msgpack(), deadline, "test"), deadline


def test_a_ring_reaches_its_bell_and_rings_for_other_jobs_are_set_apart():
    bell, ringer = Doorbell(), Ringer()
    try:
        assert ringer.ring(bell.name, "other-job", b"old handle")
        assert ringer.ring(bell.name, "my-job", b"my handle")
        mine, stale = bell.take("my-job")
        assert mine == b"my handle" and stale == [b"old handle"]
        assert bell.take("my-job") == (None, [])  # nothing left queued
    finally:
        bell.close()
        ringer.close()


def test_datagrams_that_are_not_rings_are_dropped():
    bell = Doorbell()
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sender.sendto(os.urandom(40), "\0" + bell.name)
        sender.sendto(Ring("j", b"h").to_msgpack()[:-3], "\0" + bell.name)  # truncated msgpack
        assert bell.take("j") == (None, [])
    finally:
        sender.close()
        bell.close()


def test_ringing_a_bell_nobody_listens_on_fails_softly():
    bell, ringer = Doorbell(), Ringer()
    name = bell.name
    bell.close()
    assert ringer.ring(name, "j", b"h") is False
    ringer.close()


def test_a_request_names_only_a_doorbell():
    ok = EncodeRequest(prompts=["x"], bell=Doorbell().name)
    assert ok.validate() is ok
    for bad in ("/dev/shm/x", "eb-bell-1-xyz", "eb-bell-12-0123456789abcdef\n", 7):
        with pytest.raises(InvalidRequest, match="doorbell"):
            EncodeRequest(prompts=["x"], bell=bad).validate()


def test_the_worker_rings_the_result_to_its_client_and_records_it_in_redis(encoder_worker, baseline):
    client = EncoderClient(encoder_worker["url"], timeout=30)
    try:
        bell = client._doorbell()
        job_id, deadline = submit(client, "a heron at dawn", bell.name)
        outcome = client.wire.wait(job_id, deadline, bell)
        assert_encoded(outcome, "doorbell", "a heron at dawn", baseline)
        # the result reaches Redis as well: status, registry and result stream, with the same handle
        r = redis.Redis.from_url(encoder_worker["url"])
        assert eventually(lambda: r.hget(f"rq:job:{job_id}", "status") == b"finished")
        assert r.zscore("rq:finished:encode", job_id) is not None
        entry = r.xrange(f"rq:results:{job_id}")[-1][1]
        assert MsgpackSerializer.loads(base64.b64decode(entry[b"return_value"])) == outcome.value
    finally:
        client.close()


def test_a_result_nobody_rings_comes_through_redis(encoder_worker, baseline):
    """A job whose worker can't ring (here: the request names no bell, as a worker on another host would not
    ring) is still answered while the client waits on its bell."""
    client = EncoderClient(encoder_worker["url"], timeout=30)
    try:
        job_id, deadline = submit(client, "a quiet harbour")
        assert_encoded(client.wire.wait(job_id, deadline, client._doorbell()), "redis", "a quiet harbour", baseline)
    finally:
        client.close()


def test_a_worker_whose_ring_is_not_heard_still_delivers_through_redis(encoder_worker, baseline):
    client = EncoderClient(encoder_worker["url"], timeout=30, doorbell=False)
    try:
        gone = Doorbell()
        name = gone.name
        gone.close()
        job_id, deadline = submit(client, "nobody at the door", name)
        assert_encoded(client.wire.wait(job_id, deadline), "redis", "nobody at the door", baseline)
    finally:
        client.close()


def test_a_stale_ring_is_dropped_and_its_segment_unlinked(encoder_worker, baseline):
    client = EncoderClient(encoder_worker["url"], timeout=30)
    ringer = Ringer()
    try:
        bell = client._doorbell()
        stale = write_segment(8, 30, "ebstale", [(0, b"\0" * 8)])
        assert ringer.ring(bell.name, uuid.uuid4().hex, shm_handle(stale))
        got = client.encode(["the lighthouse keeper"])[0]
        assert torch.equal(got, baseline.encode(["the lighthouse keeper"])[0].to(got.dtype))
        assert not segment_exists(stale)
    finally:
        ringer.close()
        client.close()


def test_a_ring_that_wins_leaves_the_wire_usable(redis_server):
    """When the ring comes first, the XREAD raced against it is still pending; the next wait reads its reply or,
    if it has not come (here: never), replaces the connection."""
    queue = "bell-" + uuid.uuid4().hex[:8]
    wire = JobWire(redis_server.url, queue, ENCODE_FUNCTION, timeout=20, retries=0)
    bell, ringer = Doorbell(), Ringer()
    r = redis.Redis.from_url(redis_server.url)
    try:
        first = wire.submit(b"payload", wire.deadline())
        assert ringer.ring(bell.name, first, b"rung")
        outcome = wire.wait(first, wire.deadline(), bell)
        assert (outcome.value, outcome.via) == (b"rung", "doorbell")  # its XREAD never gets an answer
        second = wire.submit(b"payload", wire.deadline())
        value = base64.b64encode(MsgpackSerializer.dumps(b"from redis"))
        r.xadd(f"rq:results:{second}", {"type": 1, "return_value": value, "execution_id": ""})
        outcome = wire.wait(second, wire.deadline(), bell)
        assert (outcome.value, outcome.via) == (b"from redis", "redis")
        # a third, whose previous XREAD reply has come (the second's): read off before the next XREAD
        third = wire.submit(b"payload", wire.deadline())
        assert ringer.ring(bell.name, third, b"rung again")
        assert wire.wait(third, wire.deadline(), bell).value == b"rung again"
        r.xadd(f"rq:results:{third}", {"type": 1, "return_value": value, "execution_id": ""})
        fourth = wire.submit(b"payload", wire.deadline())
        assert ringer.ring(bell.name, fourth, b"fourth")
        assert wire.wait(fourth, wire.deadline(), bell).value == b"fourth"
    finally:
        wire.close()
        bell.close()
        ringer.close()


def _encode_in_child(url: str, out) -> None:
    client = _shared_client[0]
    try:
        got = client.encode(["a forked reader"])[0]
        out.put((client._bell.pid == os.getpid(), got.shape[0]))
    except Exception as e:  # reported to the parent, which fails the test
        out.put(repr(e))


_shared_client: list = []


def test_a_forked_child_binds_a_doorbell_of_its_own(encoder_worker, baseline):
    client = EncoderClient(encoder_worker["url"], timeout=30)
    _shared_client[:] = [client]
    try:
        client.encode(["before the fork"])
        parent_bell = client._bell.name
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(target=_encode_in_child, args=(encoder_worker["url"], out))
        child.start()
        got = out.get(timeout=60)
        child.join()
        assert got == (True, baseline.encode(["a forked reader"])[0].shape[0])
        assert client._bell.name == parent_bell  # the parent's own is untouched
        assert client.encode(["after the fork"])[0].shape[0] > 0
    finally:
        _shared_client.clear()
        client.close()


def test_threads_sharing_a_client_each_get_their_own_results(encoder_worker, baseline):
    """One thread at a time waits on the doorbell (the others on Redis): no thread takes another's ring."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"a shared client, thread request {i}" for i in range(12)]
    with EncoderClient(encoder_worker["url"], timeout=60) as client, ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: client.handle_of([p]), prompts))
        for p, (handle, _via) in zip(prompts, got):
            (states,) = read_shm(handle)
            # (jobs of one batch: padding may move the last bits, as in tests/test_broker_e2e.py)
            torch.testing.assert_close(states, baseline.encode([p])[0].to(states.dtype), rtol=1e-5, atol=1e-5)
        assert {via for _, via in got} <= {"doorbell", "redis"} and any(via == "doorbell" for _, via in got)


def claim_stats(url: str, queue: str = "encode") -> tuple[int, int, int]:
    """(jobs claimed when rung, of those run ahead of the claim, results rung) summed over the queue's workers."""
    r = redis.Redis.from_url(url)
    totals = [0, 0, 0]
    for key in r.keys(f"eb:stats:{queue}:*"):
        s = r.hgetall(key)
        for i, name in enumerate((b"jobs_claimed_by_ring", b"jobs_run_ahead", b"results_rung")):
            totals[i] += int(float(s.get(name, 0)))
    return tuple(totals)


def test_an_idle_rung_worker_runs_the_job_at_once(encoder_worker, baseline):
    with EncoderClient(encoder_worker["url"], timeout=30) as client:
        client.encode(["learning where the workers are"])  # the first request finds this host's workers' bells
        assert client._worker_bells, "the worker advertises its doorbell"
        before = claim_stats(encoder_worker["url"])
        prompts = [f"a paper lantern no. {i}" for i in range(6)]
        for p in prompts:
            got = client.encode([p])[0]
            assert torch.equal(got, baseline.encode([p])[0].to(got.dtype))
        assert eventually(lambda: claim_stats(encoder_worker["url"])[2] >= before[2] + len(prompts))
        # (a worker still delivering the last result is busy and hands a ring on: that job comes through Redis)
        after = claim_stats(encoder_worker["url"])
        assert after[0] - before[0] >= len(prompts) // 2 and after[1] - before[1] >= len(prompts) // 2


def test_jobs_are_rung_to_one_worker_each_in_turn_skipping_a_gone_one(redis_server):
    bells = [Doorbell() for _ in range(2)]
    gone = Doorbell()
    gone.close()
    with EncoderClient(redis_server.url, queue="turns-" + uuid.uuid4().hex[:8]) as client:
        client._worker_bells = [bells[0].name, gone.name, bells[1].name]
        reached = [client._ring_workers(b"request")(f"job-{i}") for i in range(6)]
        assert reached == [1] * 6
        got = [[r.job_id for r in bell.drain()] for bell in bells]
        assert sorted(got[0] + got[1]) == [f"job-{i}" for i in range(6)]  # each job rung once
        assert len(got[0]) >= 2 and len(got[1]) >= 2  # in turns (the gone one's turns go to the next)
        bells[0].close()
        bells[1].close()
        assert client._ring_workers(b"request")("job-x") == 0  # nobody listens: Redis wakes a worker


def test_workers_are_rung_only_while_the_queue_is_about_empty(redis_server):
    bell = Doorbell()
    with EncoderClient(redis_server.url, queue="rings-" + uuid.uuid4().hex[:8]) as client:
        client._worker_bells = [bell.name]
        client.wire.last_queue_length = 1
        assert client._ring_workers(b"request")("job-a") == 1
        assert [(r.job_id, r.request) for r in bell.drain()] == [("job-a", b"request")]
        client._ring_workers(b"x" * (MAX_RUNG_REQUEST_BYTES + 1))("job-b")
        assert [(r.job_id, r.request) for r in bell.drain()] == [("job-b", b"")]  # too big to carry: Redis has it
        client.wire.last_queue_length = EncoderClient.RING_MAX_QUEUE + 1  # workers busy: Redis wakes one
        assert client._ring_workers(b"request") is None
        client.wire.last_queue_length = -3  # refused: the queue is full
        assert client._ring_workers(b"request") is None
    bell.close()


def test_only_live_doorbells_of_this_host_are_rung():
    live, lapsed, elsewhere = (Doorbell().name for _ in range(3))
    now = time.time()
    advertised = {live.encode(): f"{host_id()} {now + 20:.0f}".encode(),
                  lapsed: f"{host_id()} {now - 1:.0f}",
                  elsewhere: f"another-host/boot/1 {now + 20:.0f}",
                  "not-a-bell": f"{host_id()} {now + 20:.0f}",
                  Doorbell().name: "garbage"}
    assert local_bells(advertised, host_id(), now) == [live]


@pytest.fixture
def queue_parts(redis_server):
    """A fresh queue: (its name, a Redis connection, a client's JobWire, a worker's JobSource)."""
    queue = "rung-" + uuid.uuid4().hex[:8]
    r = redis.Redis.from_url(redis_server.url)
    wire = JobWire(redis_server.url, queue, ENCODE_FUNCTION, timeout=20, retries=0)
    yield queue, r, wire, JobSource(r, queue, "worker-" + uuid.uuid4().hex[:6], max_payload_bytes=1 << 20)
    wire.close()


def wake_tokens(r, queue: str) -> int:
    return r.llen(wake_key(queue))


def test_a_job_rung_to_a_worker_wakes_none_through_redis_unless_the_ring_reached_none(queue_parts):
    queue, r, wire, _ = queue_parts
    rung = []
    job = wire.submit(b"payload", wire.deadline(), ring=lambda job_id: rung.append(job_id) or 1)
    assert rung == [job] and r.lrange(queue_key(queue), 0, -1) == [job.encode()]
    assert wake_tokens(r, queue) == 0  # the worker rung claims it itself
    missed = wire.submit(b"payload", wire.deadline(), ring=lambda job_id: 0)
    assert wake_tokens(r, queue) == 1  # nobody heard: a worker is woken through Redis
    plain = wire.submit(b"payload", wire.deadline())
    assert wake_tokens(r, queue) == 2
    assert r.lrange(queue_key(queue), 0, -1) == [job.encode(), missed.encode(), plain.encode()]


def test_a_claim_takes_only_a_job_still_queued(queue_parts):
    queue, r, wire, source = queue_parts
    req = EncodeRequest(prompts=["claimed"]).to_msgpack()
    first, second = (wire.submit(req, wire.deadline(), ring=lambda job_id: 1) for _ in range(2))
    (taken,) = source.claim([second], 60)  # out of queue order: the one rung
    assert (taken.job_id, taken.rung, taken.request.prompts) == (second, True, ["claimed"])
    assert r.hget(f"rq:job:{second}", "status") == b"started"
    assert r.zcard(f"rq:wip:{queue}") == 1
    assert r.lrange(queue_key(queue), 0, -1) == [first.encode()]
    assert wake_tokens(r, queue) == 1  # jobs remain, rung without a token: the next wait must not block
    assert source.claim([second], 60) == []  # taken already
    (rest,) = source.take(None, 5, 60)
    assert rest.job_id == first and not rest.rung
    assert wake_tokens(r, queue) == 0
    never = uuid.uuid4().hex
    assert source.claim([never], 60) == []  # never enqueued: given up after a moment ...
    assert r.exists(hand_on_key(never))  # ... handed on, should its enqueue (without a token) still run


def test_a_claim_after_redis_lost_its_scripts_still_takes_the_job(queue_parts):
    queue, r, wire, source = queue_parts
    jobs = [wire.submit(EncodeRequest(prompts=["claimed"]).to_msgpack(), wire.deadline(), ring=lambda _: 1)
            for _ in range(2)]
    r.script_flush()  # as after a restart
    assert sorted(t.job_id for t in source.claim(jobs, 60)) == sorted(jobs)
    assert r.llen(queue_key(queue)) == 0


def test_a_claim_that_reaches_redis_before_its_enqueue_waits_for_it(queue_parts):
    """A client rings before it enqueues: the worker's claim can come first."""
    queue, r, wire, source = queue_parts
    rung = queue_module.Queue()
    request = EncodeRequest(prompts=["rung first"]).to_msgpack()

    def ring_then_pause(job_id: str) -> int:
        rung.put(job_id)
        time.sleep(0.005)  # the enqueue runs well after the claim was sent
        return 1

    enqueuer = threading.Thread(target=wire.submit, args=(request, wire.deadline()),
                                kwargs=dict(ring=ring_then_pause))
    enqueuer.start()
    job_id = rung.get(timeout=10)
    assert not r.exists(f"rq:job:{job_id}")
    (taken,) = source.claim([job_id], 60)
    enqueuer.join()
    assert (taken.job_id, taken.request.prompts) == (job_id, ["rung first"])
    assert r.llen(queue_key(queue)) == 0 and wake_tokens(r, queue) == 0


def test_a_wait_in_two_halves_ends_when_a_job_comes(queue_parts):
    queue, r, wire, source = queue_parts
    source.begin_wait(4, 60, 5.0)
    source.begin_wait(4, 60, 5.0)  # one wait at a time: a second begin is a no-op
    assert source.end_wait() is None  # nothing yet
    job = wire.submit(EncodeRequest(prompts=["waited for"]).to_msgpack(), wire.deadline())
    got = []
    assert eventually(lambda: got.extend(source.end_wait() or []) or got)
    assert [t.job_id for t in got] == [job] and not got[0].rung
    assert source.end_wait() == []  # no wait under way


def test_a_rung_job_handed_on_wakes_a_worker_whether_or_not_it_is_enqueued_yet(queue_parts):
    """A worker hands on the jobs rung to it while busy; a ring comes before its job's enqueue (which then
    pushes no wake-up token), so a job handed on early gets its token when it is enqueued."""
    queue, r, wire, source = queue_parts
    request = EncodeRequest(prompts=["handed on"]).to_msgpack()
    enqueued = wire.submit(request, wire.deadline(), ring=lambda _: 1)
    assert wake_tokens(r, queue) == 0
    source.hand_on([enqueued])
    assert wake_tokens(r, queue) == 1  # already queued: a token now
    (taken,) = source.take(None, 4, 60)
    assert taken.job_id == enqueued and wake_tokens(r, queue) == 0

    early = []
    late = wire.submit(request, wire.deadline(),
                       ring=lambda job_id: early.append(job_id) or source.hand_on([job_id]) or 1)
    assert early == [late] and wake_tokens(r, queue) == 1  # its enqueue pushed the token
    assert not r.exists(hand_on_key(late))
    source.take(None, 4, 60)
    plain = wire.submit(request, wire.deadline(), ring=lambda _: 1)
    assert wake_tokens(r, queue) == 0 and r.lrange(queue_key(queue), 0, -1) == [plain.encode()]
