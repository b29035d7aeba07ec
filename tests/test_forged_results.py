"""A result handle comes through Redis or a doorbell, so anyone who can write there can forge one: a handle a worker
of this queue did not make is ResultLost with the reason, in the client and at the HTTP front, and nothing is
opened, read or deleted. A fake worker takes the job from the queue and answers with the forgery, as
a worker records a result (broker/protocol/lua/record.lua: an entry in the job's result stream) or rings a doorbell."""

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis

from broker.client import EncoderClient
from broker.errors import ResultLost
from broker.protocol import keys
from broker.protocol.doorbell import Ringer
from broker.protocol.schemas import Handle
from broker.protocol.serializer import MsgpackSerializer
from broker.results import SHM_PREFIX_ENV, discard_result, read_shm
from shm import SHM_DIR, unlink_segment, write_segment
from tests.helpers import REPO, eventually, free_port, start_process, stop_process
from tests.test_http_front import call, lightx2v_payload, stalled_worker

NUL_NAME = "/a\x00b"
STATES = bytes(range(16))  # a [1, 4] float32 result


@pytest.fixture(autouse=True)
def default_prefix(monkeypatch):
    """Clients here take the default prefix, "eb", whatever the shell running the tests sets."""
    monkeypatch.delenv(SHM_PREFIX_ENV, raising=False)


def shm_handle(location: str, transport: str = "shm") -> Handle:
    return Handle(transport=transport, location=location, dtype="float32", shapes=[[1, 4]], offsets=[0],
                  nbytes=len(STATES), expires_at=time.time() + 30)


def recorded(value: bytes) -> dict:
    """A successful result entry of RQ's result stream, as RECORD writes it, returning `value`."""
    return {"type": 1, "return_value": base64.b64encode(MsgpackSerializer.dumps(value)), "execution_id": ""}


def fake_worker(url: str, queue: str, entry: dict | None = None, handle: bytes = b"",
                bell: str = "") -> threading.Thread:
    """A thread that takes the next job of `queue` and answers it: `entry` (or a result returning `handle`) in its
    result stream, or, with `bell`, `handle` rung to that doorbell."""
    def run():
        r = redis.Redis.from_url(url)
        _key, job_id = r.blpop(keys.QueueKeys(queue).queue, timeout=30)
        if bell:
            ringer = Ringer()
            assert ringer.ring(bell, job_id.decode(), handle)
            ringer.close()
        else:
            r.xadd(keys.results(job_id.decode()), entry or recorded(handle))
        r.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def client_meets(url: str, handle: Handle, via: str = "redis", api: str = "encode") -> BaseException | None:
    """What an EncoderClient (default shm prefix) raises when a fake worker answers its job with `handle`, recorded
    in Redis or rung to the client's doorbell (via), for `encode` or `aencode` (api)."""
    queue = "forged-" + uuid.uuid4().hex[:8]
    with EncoderClient(url, queue=queue, timeout=10) as client:
        bell = client._doorbell().name if via == "doorbell" else ""
        worker = fake_worker(url, queue, handle=handle.to_msgpack(), bell=bell)
        try:
            if api == "aencode":
                async def run():
                    try:
                        return await client.aencode(["x"])
                    finally:
                        await client.aclose()
                asyncio.run(run())
            else:
                client.encode(["x"])
        except Exception as e:  # what the test looks at
            return e
        finally:
            worker.join(30)
    return None


def report(e: BaseException | None) -> str:
    return "no error" if e is None else f"{type(e).__name__}: {e}"


CHILD = """
import json, sys
from tests.test_forged_results import client_meets, report, shm_handle
from broker.results import read_shm
how, url, location = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if how == "read_shm":
    try:
        read_shm(shm_handle(location))
        print("no error")
    except Exception as e:
        print(report(e))
else:
    print(report(client_meets(url, shm_handle(location), via=how)))
"""


@pytest.mark.parametrize("how", ["read_shm", "redis", "doorbell"])
def test_a_nul_in_a_segment_name_is_result_lost_not_a_crash(redis_server, how):
    """In a child process: a crash there (posix_ipc on a NUL: SIGSEGV) fails this test instead of ending pytest."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop(SHM_PREFIX_ENV, None)
    child = subprocess.run([sys.executable, "-c", CHILD, how, redis_server.url, json.dumps(NUL_NAME)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, f"the client died ({child.returncode}): {child.stderr[-2000:]}"
    assert child.stdout.strip().startswith("ResultLost: result refused: '/a\\x00b' is not a segment name"), \
        child.stdout + child.stderr[-2000:]


@pytest.mark.parametrize("name", ["/../../etc/passwd", "/etc/passwd", "..", "/", "eb", "/eb.1.2.0123456789abcdef/x",
                                  "/eb.1.2.0123456789abcdeg", "/eb.1.2.0123456789abcdef\n"])
def test_a_name_no_worker_makes_is_result_lost_before_anything_opens_it(name):
    with pytest.raises(ResultLost, match="is not a segment name a worker makes.*nothing was opened"):
        read_shm(shm_handle(name))


@pytest.mark.parametrize("via", ["redis", "doorbell"])
def test_a_path_in_a_forged_handle_is_result_lost(redis_server, via):
    err = client_meets(redis_server.url, shm_handle("/../../etc/passwd"), via=via)
    assert isinstance(err, ResultLost) and "is not a segment name a worker makes" in str(err), report(err)


@pytest.fixture
def other_prefix_segment():
    """A segment as a worker makes them (this user's, 0600, the size the handle states), under another prefix."""
    name = write_segment(len(STATES), 30, "ebo" + uuid.uuid4().hex[:6], [(0, STATES)])
    yield name
    unlink_segment(name)


def segment_bytes(name: str) -> bytes | None:
    try:
        with open(os.path.join(SHM_DIR, name.lstrip("/")), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("via, api", [("redis", "encode"), ("doorbell", "encode"), ("redis", "aencode")])
def test_a_segment_of_another_prefix_is_left_in_place(redis_server, other_prefix_segment, via, api):
    err = client_meets(redis_server.url, shm_handle(other_prefix_segment), via=via, api=api)
    assert isinstance(err, ResultLost) and "is named under shm prefix 'ebo" in str(err), report(err)
    assert "shm_prefix=" in str(err)  # what to set, if that prefix is the workers'
    assert segment_bytes(other_prefix_segment) == STATES


def test_a_stale_ring_unlinks_only_a_segment_of_the_clients_prefix(other_prefix_segment):
    """A ring for a job the client no longer waits for: its segment is unlinked only if named under the client's
    prefix (the workers')."""
    handle = shm_handle(other_prefix_segment).to_msgpack()
    discard_result(handle)
    assert segment_bytes(other_prefix_segment) == STATES
    discard_result(handle, prefix=other_prefix_segment.split(".")[0].lstrip("/"))
    assert segment_bytes(other_prefix_segment) is None


def test_a_client_of_that_prefix_reads_it(redis_server, other_prefix_segment):
    """The prefix is the only reason for the refusal above: a client told the workers' prefix reads it."""
    prefix = other_prefix_segment.split(".")[0].lstrip("/")
    queue = "forged-" + uuid.uuid4().hex[:8]
    with EncoderClient(redis_server.url, queue=queue, timeout=10, shm_prefix=prefix, doorbell=False) as client:
        worker = fake_worker(redis_server.url, queue, handle=shm_handle(other_prefix_segment).to_msgpack())
        (got,) = client.encode(["x"])
        worker.join(30)
    assert got.numpy().tobytes() == STATES and segment_bytes(other_prefix_segment) is None


@pytest.mark.parametrize("key", ["innocent:key", keys.blob("another-job", "x1"), keys.blob("job", "x1") + ":../k"])
@pytest.mark.parametrize("via, api", [("redis", "encode"), ("doorbell", "encode"), ("redis", "aencode")])
def test_a_blob_key_that_is_not_the_jobs_is_left_intact(redis_server, key, via, api):
    r = redis.Redis.from_url(redis_server.url)
    r.set(key, b"precious")
    try:
        err = client_meets(redis_server.url, shm_handle(key, transport="blob"), via=via, api=api)
        assert isinstance(err, ResultLost) and "is not a result key of job" in str(err) and "nothing was read" in str(err), \
            report(err)
        assert r.get(key) == b"precious"
    finally:
        r.delete(key)


# -- the HTTP front ------------------------------------------------------------------------------------------------

def front_answers(port: int) -> bool:
    try:
        return call(port, "GET", "/liveness")[0] in (200, 503)
    except OSError:
        return False


def test_the_front_answers_forged_results_with_json_and_stays_up(redis_server, tmp_path):
    """The front in a process of its own (a NUL once killed it with SIGSEGV): each forgery gets a JSON 502 that
    says why, and the front goes on serving."""
    queue, port, log = "forged-front-" + uuid.uuid4().hex[:6], free_port(), str(tmp_path / "front.log")
    env = {"PYTHONPATH": REPO}
    proc = start_process(["-m", "broker.http", "--port", str(port), "--redis-url", redis_server.url,
                          "--queue", queue, "--timeout", "10", "--shm-prefix", "ebh" + uuid.uuid4().hex[:6]],
                         log, env=env)
    r = redis.Redis.from_url(redis_server.url)
    r.set("innocent:key", b"precious")
    with stalled_worker(redis_server.url, queue):  # the front refuses at once while no worker serves
        try:
            assert eventually(lambda: front_answers(port) or proc.poll() is not None, timeout=60), open(log).read()
            forgeries = [
                (recorded(shm_handle(NUL_NAME).to_msgpack()), "is not a segment name a worker makes"),
                (recorded(shm_handle("/../../etc/passwd").to_msgpack()), "is not a segment name a worker makes"),
                (recorded(shm_handle("innocent:key", transport="blob").to_msgpack()), "is not a result key of job"),
                ({"type": 1, "return_value": "not base64 at all!"}, "result entry is malformed"),
            ]
            for entry, says in forgeries:
                worker = fake_worker(redis_server.url, queue, entry=entry)
                status, body, headers = call(port, "POST", "/generate", lightx2v_payload("a forged answer"))
                worker.join(30)
                assert proc.poll() is None, open(log).read()[-3000:]
                assert (status, headers["content-type"]) == (502, "application/json"), (status, body)
                assert body["code"] == 502 and "the encoder's result could not be read" in body["message"], body
                assert says in body["message"], body
            assert r.get("innocent:key") == b"precious"
            assert front_answers(port)
        finally:
            r.delete("innocent:key")
            stop_process(proc)
