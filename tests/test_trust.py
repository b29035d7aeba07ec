"""What a Redis reachable by others can send us: zlib bombs are bounded, and result segments are read only from
owners and modes we trust, at the size the handle states."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import tracemalloc
import uuid
import zlib

import pytest
import redis
import torch

import shm
from broker.client import EncoderClient
from broker.errors import BrokerUnavailable, ResultLost
from broker.ops.redis_server import ensure_credential, write_config
from broker.protocol.connections import DEFAULT_PASSWORD_FILE, PASSWORD_FILE_ENV, connect, redacted
from broker.protocol.schemas import Handle
from broker.protocol.serializer import InflateLimitExceeded, inflate
from broker.results import TRUSTED_UIDS_ENV, read_shm, trusted_owners
from tests.conftest import TEST_MAX_PROMPT_TOKENS
from tests.helpers import REPO, RedisServer, eventually, start_worker, stop_process, wait_for_workers
from tests.test_broker_e2e import assert_same, zlib_bomb


def test_inflate_refuses_a_bomb_having_made_no_more_than_its_bound():
    bomb = zlib_bomb(256 << 20)  # 256 MiB of zeros in about 256 KB
    assert len(bomb) < 1 << 20
    limit = 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(InflateLimitExceeded, match=f"past {limit} bytes"):
            inflate(bomb, limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * limit  # the bounded output (limit + 1 bytes), never the 256 MiB


def test_inflate_gives_back_what_fits_and_refuses_what_is_cut_short():
    data = b"a job record" * 1000
    packed = zlib.compress(data)
    assert inflate(packed, len(data)) == data
    with pytest.raises(InflateLimitExceeded):
        inflate(packed, len(data) - 1)
    with pytest.raises(zlib.error, match="truncated"):
        inflate(packed[:-8], len(data))
    with pytest.raises(zlib.error):
        inflate(b"not zlib at all", 100)


# -- S1: result segments are read only when trusted ----------------------------------------------------------------

def _handle(name: str, states: torch.Tensor) -> Handle:
    return Handle(transport="shm", location=name, dtype="float32", shapes=[list(states.shape)], offsets=[0],
                  nbytes=states.numel() * 4, expires_at=time.time() + 30)


def _path(name: str) -> str:
    return f"/dev/shm/{name.lstrip('/')}"


@pytest.fixture
def states():
    return torch.randn(5, 8)


@pytest.fixture
def segment(states):
    """make(size=None): a segment holding `states` (of `size` bytes if given), as a worker writes it; whatever the
    test leaves of them is unlinked after it."""
    names = []

    def make(size: int | None = None) -> str:
        data = states.numpy().tobytes()
        names.append(shm.write_segment(len(data) if size is None else size, 30, "ebtrust", [(0, data)]))
        return names[-1]

    yield make
    for n in names:
        shm.unlink_segment(n)


@pytest.mark.parametrize("copy", [True, False])
def test_a_segment_the_worker_made_is_read_and_unlinked(states, segment, copy):
    name = segment()
    (got,) = read_shm(_handle(name, states), copy=copy, prefix="ebtrust")
    assert torch.equal(got, states)
    assert not os.path.exists(_path(name))


@pytest.mark.parametrize("copy", [True, False])
def test_a_segment_others_could_write_is_refused(states, segment, copy):
    name = segment()
    os.chmod(_path(name), 0o644)
    with pytest.raises(ResultLost, match="has mode 0644, not 0600"):
        read_shm(_handle(name, states), copy=copy, prefix="ebtrust")
    assert os.path.exists(_path(name))  # left where it is


@pytest.mark.skipif(os.getuid() != 0, reason="giving a segment to another user needs root")
@pytest.mark.parametrize("copy", [True, False])
def test_a_segment_of_another_owner_is_refused_unless_trusted(states, segment, copy):
    other = 54321
    name = segment()
    os.chown(_path(name), other, -1)
    with pytest.raises(ResultLost, match=f"owned by uid {other}, not by this process's uid"):
        read_shm(_handle(name, states), copy=copy, prefix="ebtrust")
    assert os.path.exists(_path(name))
    (got,) = read_shm(_handle(name, states), copy=copy, trusted=trusted_owners([other]), prefix="ebtrust")
    assert torch.equal(got, states)


@pytest.mark.skipif(os.getuid() != 0, reason="giving a segment to another user needs root")
def test_trusted_uids_come_from_the_client_and_the_environment(monkeypatch):
    monkeypatch.setenv(TRUSTED_UIDS_ENV, "1001, 1002")
    assert trusted_owners([7]) == {os.getuid(), 7, 1001, 1002}
    monkeypatch.setenv(TRUSTED_UIDS_ENV, "nobody")
    with pytest.raises(ValueError, match="comma-separated uids"):
        trusted_owners()


@pytest.mark.parametrize("copy", [True, False])
def test_a_segment_of_another_size_than_the_handle_states_is_refused(states, segment, copy):
    name = segment(size=states.numel() * 4 + 4096)  # room for more than the handle says
    with pytest.raises(ResultLost, match=f"holds {states.numel() * 4 + 4096} bytes, not the {states.numel() * 4}"):
        read_shm(_handle(name, states), copy=copy, prefix="ebtrust")


def test_a_handle_whose_states_do_not_fit_its_bytes_is_refused(states, segment):
    bad = _handle(segment(), states)
    bad.shapes = [[500, 8]]
    with pytest.raises(ResultLost, match=r"shape \[500, 8\] at offset 0 does not fit its 160 bytes"):
        read_shm(bad, prefix="ebtrust")


# -- S1: the Redis asks for a password -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def locked_redis():
    server = RedisServer(password=True).start()
    yield server
    server.cleanup()


def test_the_credential_is_made_once_with_mode_0600_and_redis_conf_keeps_it_off_the_command_line(tmp_path):
    path = str(tmp_path / "redis" / "password")
    password = ensure_credential(path)
    assert len(password) >= 40 and ensure_credential(path) == password  # made once, then read
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    conf = write_config(str(tmp_path / "redis" / "redis.conf"), password, 6390)
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
    assert f"requirepass {password}\n" in open(conf).read()
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="others can read it"):
        ensure_credential(path)


def test_connect_takes_the_password_from_the_url_or_the_file(locked_redis, monkeypatch):
    authed = f"redis://:{locked_redis.password}@127.0.0.1:{locked_redis.port}/0"
    assert connect(authed).ping()
    monkeypatch.setenv(PASSWORD_FILE_ENV, locked_redis.password_file)
    assert connect(locked_redis.url).ping()

    async def aping():
        r = connect(locked_redis.url, asyncio=True)
        try:
            return await r.ping()
        finally:
            await r.aclose()

    assert asyncio.run(aping())
    monkeypatch.delenv(PASSWORD_FILE_ENV)
    with pytest.raises(redis.AuthenticationError):
        connect(locked_redis.url).ping()
    assert redacted(authed) == f"redis://:***@127.0.0.1:{locked_redis.port}/0"


def test_a_locked_redis_serves_a_client_and_a_worker_that_have_the_password_and_no_others(
        tiny_dir, baseline, locked_redis, tmp_path, monkeypatch):
    authed = f"redis://:{locked_redis.password}@127.0.0.1:{locked_redis.port}/0"
    config = dict(model_dir=tiny_dir, backend="baseline", device="cpu", redis_url=locked_redis.url,
                  max_prompt_tokens=TEST_MAX_PROMPT_TOKENS, shm_prefix="ebtlock", result_ttl_s=30)
    with_pw, with_log = start_worker(tmp_path, "with", env={PASSWORD_FILE_ENV: locked_redis.password_file}, **config)
    without, without_log = start_worker(tmp_path, "without", **config)
    try:
        wait_for_workers(authed, 1, with_pw, with_log)
        with EncoderClient(authed, timeout=30, shm_prefix="ebtlock") as c:  # the password in the URL
            assert_same(c.encode(["a locked door"]), baseline.encode(["a locked door"]))
        monkeypatch.setenv(PASSWORD_FILE_ENV, locked_redis.password_file)
        with EncoderClient(locked_redis.url, timeout=30, shm_prefix="ebtlock") as c:  # the password from its file
            assert_same(c.encode(["a key"]), baseline.encode(["a key"]))
        monkeypatch.delenv(PASSWORD_FILE_ENV)
        with EncoderClient(locked_redis.url, timeout=10, retries=0) as c:
            with pytest.raises(BrokerUnavailable, match="asks for a password"):
                c.encode(["no key"])
        # It says why in one line that names where the password goes, and keeps trying (no exit to race with).
        assert eventually(lambda: PASSWORD_FILE_ENV in open(without_log).read(), timeout=120)
        said = open(without_log).read()
        assert "Authentication required" in said and DEFAULT_PASSWORD_FILE in said and "Traceback" not in said, said
        assert without.poll() is None
        assert connect(authed).scard("rq:workers") == 1  # only the worker with the password got in
        stats = subprocess.run([sys.executable, "-m", "broker", "stats", "--json", "--redis-url", locked_redis.url],
                               capture_output=True, text=True, env=dict(os.environ, **{
                                   PASSWORD_FILE_ENV: locked_redis.password_file}), cwd=REPO, timeout=60)
        assert stats.returncode == 0, stats.stderr
        assert len(json.loads(stats.stdout)["workers"]) == 1
    finally:
        stop_process(with_pw)
        stop_process(without)


def test_a_worker_waits_for_the_password_file_its_redis_writes_on_first_run(tiny_dir, baseline, locked_redis,
                                                                             tmp_path):
    """Under honcho, .env names var/redis/password for every process and the Procfile's Redis makes it on its first
    run: a worker that starts first says what it waits for (no traceback, no exit that would stop the others),
    then serves once the file is there."""
    later = str(tmp_path / "redis" / "password")
    queue = "later-" + uuid.uuid4().hex[:6]
    proc, log = start_worker(tmp_path, "later", env={PASSWORD_FILE_ENV: later}, model_dir=tiny_dir,
                             backend="baseline", device="cpu", redis_url=locked_redis.url, queue=queue,
                             max_prompt_tokens=TEST_MAX_PROMPT_TOKENS, shm_prefix="ebtlate")
    try:
        assert eventually(lambda: f"cannot read the Redis password from {later}" in open(log).read(), timeout=120)
        assert PASSWORD_FILE_ENV in open(log).read() and proc.poll() is None
        os.makedirs(os.path.dirname(later), mode=0o700)
        shutil.copyfile(locked_redis.password_file, later)  # as that Redis would have written it
        authed = f"redis://:{locked_redis.password}@127.0.0.1:{locked_redis.port}/0"
        wait_for_workers(authed, 1, proc, log, queue=queue)
        with EncoderClient(authed, queue=queue, timeout=30, shm_prefix="ebtlate") as c:
            assert_same(c.encode(["at last"]), baseline.encode(["at last"]))
        assert "Traceback" not in open(log).read()
    finally:
        stop_process(proc)
