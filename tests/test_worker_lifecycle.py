"""A worker as an operator meets it, with real processes and a real Redis: its registration outlives whatever
Redis drops of it, and stopping it together with its Redis (Ctrl-C under honcho) is quiet and clean."""

import signal
import socket
import uuid

import pytest
import redis

from broker.ops.stats import collect
from tests.conftest import TEST_MAX_PROMPT_TOKENS
from tests.helpers import eventually, start_worker, stop_process, wait_for_workers
from tests.test_http_front import FrontThread, call
from workers.serve_loop import ServeLoop


def start(module, folder, tiny_dir, url, queue):
    """An encoder worker (`workers`) or a DiT worker (`dit_workers`, its prompts encoded through the broker) on
    `queue`, once registered: (process, log)."""
    if module == "workers":
        config = dict(model_dir=tiny_dir, backend="baseline", max_prompt_tokens=TEST_MAX_PROMPT_TOKENS,
                      shm_prefix="ebl" + uuid.uuid4().hex[:6], job_heartbeat_ttl_s=2, housekeeping_interval_s=0.5)
    else:
        from dit_workers.make_tiny_pipeline import ensure_tiny_pipeline

        config = dict(text_encoder_type="service", model_path=ensure_tiny_pipeline(tiny_dir),
                      make_tiny_if_missing=False)
    proc, log = start_worker(folder, module, module, device="cpu", redis_url=url, queue=queue, **config)
    wait_for_workers(url, 1, proc, log, queue=queue)
    return proc, log


def test_a_worker_puts_back_its_registration_when_redis_drops_it(tiny_dir, own_redis, tmp_path):
    """`DEL rq:workers:encode` (allkeys-lru evicts the same way) and the worker's record: the worker's heartbeat
    writes them back, so /health is 200 again and `broker stats` shows the worker as it was."""
    proc, log = start("workers", tmp_path, tiny_dir, own_redis.url, "encode")
    r = redis.Redis.from_url(own_redis.url)
    (key,) = r.smembers("rq:workers:encode")
    try:
        with FrontThread(redis_url=own_redis.url, queue="encode") as front:
            assert eventually(lambda: call(front.port, "GET", "/health")[0] == 200, timeout=30)
            for dropped in (["rq:workers:encode", key], ["rq:workers:encode", "rq:workers", key]):
                r.delete(*dropped)
                assert eventually(lambda: call(front.port, "GET", "/health")[0] == 200, timeout=60), \
                    open(log).read()[-3000:]
                assert r.sismember("rq:workers", key)
                (w,) = collect(r, "encode")["workers"]
                assert (w["name"], w["state"], w["pid"], w["host"], w["device"]) == (
                    key.decode().rsplit(":", 1)[-1], "idle", str(proc.pid), socket.gethostname(), "cpu")
    finally:
        stop_process(proc)


def test_each_heartbeat_writes_back_what_redis_dropped(redis_server):
    """The heartbeat every queue-serving process shares (encoder and DiT workers, workers.serve_loop)."""
    loop = ServeLoop(redis_server.url, "dropped-" + uuid.uuid4().hex[:6], 1 << 20)
    loop.device = "cuda:1"
    loop.ensure_registered()
    r = loop.connection
    key = loop.rq_worker.key
    try:
        r.delete(f"rq:workers:{loop.queue}", "rq:workers", key)
        loop.heartbeat()
        assert r.sismember(f"rq:workers:{loop.queue}", key) and r.sismember("rq:workers", key)
        (w,) = collect(r, loop.queue)["workers"]
        assert (w["state"], w["device"], w["host"], w["last_heartbeat"] != "") == (
            "idle", "cuda:1", socket.gethostname(), True)
        assert 0 < r.ttl(key) <= loop.heartbeat_ttl_s + 60  # it still expires if the worker dies
    finally:
        loop.unregister()
    assert not r.sismember(f"rq:workers:{loop.queue}", key)


@pytest.mark.parametrize("module", ["workers", "dit_workers"])
def test_a_worker_stopped_with_its_redis_says_no_error_and_exits_0(module, tiny_dir, own_redis, tmp_path):
    """Ctrl-C under honcho signals Redis and the workers at once; Redis may well close first."""
    proc, log = start(module, tmp_path, tiny_dir, own_redis.url, "q-" + module)
    try:
        own_redis.proc.terminate()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        stop_process(proc)
    text = open(log).read()
    assert "ERROR" not in text and "Traceback" not in text, text
    assert " stopped" in text, text
