import os
import uuid

import pytest
import torch

# Triton reads this when kernels are defined, so it is set before any test module imports workers.kernels:
# without a GPU, the Triton kernels run in the interpreter (slowly: tests keep shapes tiny).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests start their own Redis, with no password unless a test makes one: a password file named by the shell that
# runs them is not theirs.
os.environ.pop("EB_REDIS_PASSWORD_FILE", None)

from tests.helpers import (TINY_DIR, RedisServer, Workers, free_port, shm_names, start_worker, stop_process,
                           wait_for_workers)

TEST_MAX_PROMPT_TOKENS = 96


@pytest.fixture(scope="session")
def tiny_dir():
    from workers.make_tiny import ensure_tiny

    return ensure_tiny(TINY_DIR)


@pytest.fixture(scope="session")
def baseline(tiny_dir):
    from workers.encoders import load_encoder

    return load_encoder(tiny_dir, backend="baseline", max_prompt_tokens=TEST_MAX_PROMPT_TOKENS)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def encoder_worker(tiny_dir, redis_server, tmp_path_factory):
    """One real encoder worker process (baseline backend, CPU) serving queue 'encode' of the test Redis."""
    d = tmp_path_factory.mktemp("encoder-worker")
    prefix, metrics_port = "ebt" + uuid.uuid4().hex[:6], free_port()
    proc, log = start_worker(d, "encoder", model_dir=tiny_dir, backend="baseline", device="cpu",
                             redis_url=redis_server.url, queue="encode", max_prompt_tokens=TEST_MAX_PROMPT_TOKENS,
                             max_prompts_per_job=40, shm_prefix=prefix, result_ttl_s=30, housekeeping_interval_s=1.0,
                             metrics_port=metrics_port)
    wait_for_workers(redis_server.url, 1, proc, log)
    yield {"proc": proc, "prefix": prefix, "log": log, "url": redis_server.url, "config": str(d / "encoder.json"),
           "metrics_port": metrics_port}
    stop_process(proc)


@pytest.fixture
def client(encoder_worker):
    from broker.client import EncoderClient

    with EncoderClient(encoder_worker["url"], timeout=30, shm_prefix=encoder_worker["prefix"]) as c:
        yield c


@pytest.fixture
def own_redis():
    """A Redis of the test's own, to restart, empty or lock."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def workers(tiny_dir, own_redis, tmp_path):
    """Encoder worker processes on `own_redis` (tests.helpers.Workers); their segments removed at the end."""
    w = Workers(tiny_dir, own_redis.url, tmp_path)
    yield w
    w.stop_all()
    for name in shm_names(w.prefix):
        os.unlink(os.path.join("/dev/shm", name))
