"""The doorbell shortcut (broker.protocol.doorbell): a worker on the client's host hands a shm result's handle
straight to the waiting client; Redis stays the source of truth. Real sockets, a real Redis, the real worker process."""

import base64
import multiprocessing as mp
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import torch

from broker.client import EncoderClient
from broker.errors import InvalidRequest
from broker.protocol.doorbell import Doorbell, Ring, Ringer
from broker.protocol.queues import ENCODE_FUNCTION
from broker.protocol.schemas import EncodeRequest, Handle
from broker.protocol.serializer import MsgpackSerializer
from broker.results import read_shm
from broker.rq_wire import JobWire
from shm import SHM_DIR, write_segment
from tests.helpers import assert_encoded, eventually, submit_prompt


def shm_handle(name: str, nbytes: int = 8) -> bytes:
    return Handle(transport="shm", location=name, dtype="bfloat16", shapes=[[1, nbytes // 2]], offsets=[0],
                  nbytes=nbytes, expires_at=time.time() + 30).to_msgpack()


def segment_exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name.lstrip("/")))


def assert_came(outcome, via: str, prompt: str, baseline, prefix: str) -> None:
    """`outcome` came `via` where expected and its segment (named under `prefix`) holds `prompt`'s states."""
    assert outcome.via == via and outcome.error is None
    assert_encoded(read_shm(Handle.from_msgpack(outcome.value), prefix=prefix)[0], prompt, baseline)


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


def test_the_worker_rings_the_result_to_its_client_and_records_it_in_redis(client, encoder_worker, baseline):
    bell = client._doorbell()
    job_id, deadline = submit_prompt(client, "a heron at dawn", bell.name)
    outcome = client.wire.wait(job_id, deadline, bell)
    assert_came(outcome, "doorbell", "a heron at dawn", baseline, client.shm_prefix)
    # the result reaches Redis as well: status, registry and result stream, with the same handle
    r = redis.Redis.from_url(encoder_worker["url"])
    assert eventually(lambda: r.hget(f"rq:job:{job_id}", "status") == b"finished")
    assert r.zscore("rq:finished:encode", job_id) is not None
    entry = r.xrange(f"rq:results:{job_id}")[-1][1]
    assert MsgpackSerializer.loads(base64.b64decode(entry[b"return_value"])) == outcome.value


def test_a_result_nobody_rings_comes_through_redis(client, baseline):
    """A job whose worker can't ring (here: the request names no bell, as a worker on another host would not
    ring) is still answered while the client waits on its bell."""
    job_id, deadline = submit_prompt(client, "a quiet harbour")
    assert_came(client.wire.wait(job_id, deadline, client._doorbell()), "redis", "a quiet harbour", baseline,
                client.shm_prefix)


def test_a_worker_whose_ring_is_not_heard_still_delivers_through_redis(encoder_worker, baseline):
    gone = Doorbell()
    gone.close()
    with EncoderClient(encoder_worker["url"], timeout=30, doorbell=False,
                       shm_prefix=encoder_worker["prefix"]) as client:
        job_id, deadline = submit_prompt(client, "nobody at the door", gone.name)
        assert_came(client.wire.wait(job_id, deadline), "redis", "nobody at the door", baseline,
                    client.shm_prefix)


def test_a_stale_ring_is_dropped_and_its_segment_unlinked(client, baseline):
    ringer = Ringer()
    try:
        stale = write_segment(8, 30, client.shm_prefix, [(0, b"\0" * 8)])  # a worker's, for another job
        assert ringer.ring(client._doorbell().name, uuid.uuid4().hex, shm_handle(stale))
        assert_encoded(client.encode(["the lighthouse keeper"])[0], "the lighthouse keeper", baseline)
        assert not segment_exists(stale)
    finally:
        ringer.close()


def test_a_ring_that_wins_leaves_the_wire_usable(redis_server):
    """When the ring comes first, the XREAD raced against it is still pending (broker.protocol.connections
    DeferredReplies); the next wait reads its reply or, if it has not come (here: never), replaces the
    connection."""
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


def test_a_forked_child_binds_a_doorbell_of_its_own(client, encoder_worker, baseline):
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


def test_threads_sharing_a_client_each_get_their_own_results(encoder_worker, baseline):
    """One thread at a time waits on the doorbell (the others on Redis): no thread takes another's ring."""
    prompts = [f"a shared client, thread request {i}" for i in range(12)]
    with (EncoderClient(encoder_worker["url"], timeout=60, shm_prefix=encoder_worker["prefix"]) as client,
          ThreadPoolExecutor(4) as pool):
        got = list(pool.map(lambda p: client.handle_of([p]), prompts))
        for p, (handle, _via) in zip(prompts, got):
            (states,) = read_shm(handle, prefix=client.shm_prefix)
            # (jobs of one batch: padding may move the last bits, as in tests/test_broker_e2e.py)
            torch.testing.assert_close(states, baseline.encode([p])[0].to(states.dtype), rtol=1e-5, atol=1e-5)
        assert {via for _, via in got} <= {"doorbell", "redis"} and any(via == "doorbell" for _, via in got)
