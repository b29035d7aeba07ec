"""One EncoderClient used from many event loops, one after another (asyncio.run per call, or loops made and
closed by hand), holds connections for the loops still open only: Redis's client count and this process's open
descriptors stay bounded, whatever the number of loops."""

import asyncio
import gc
import os

import redis

from broker.client import EncoderClient

LOOPS = 60


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def redis_clients(url: str) -> int:
    return redis.Redis.from_url(url).info("clients")["connected_clients"] - 1  # less the one asking


def test_aencode_in_many_asyncio_runs_keeps_no_connection_of_a_finished_loop(encoder_worker, baseline):
    url = encoder_worker["url"]
    with EncoderClient(url, timeout=30, shm_prefix=encoder_worker["prefix"]) as c:
        (first,) = asyncio.run(c.aencode(["x"]))
        assert first.shape == baseline.encode(["x"])[0].shape
        fds, clients = open_fds(), redis_clients(url)
        for _ in range(LOOPS):
            asyncio.run(c.aencode(["x"]))
        assert open_fds() <= fds + 2
        assert redis_clients(url) <= clients + 2
        assert len(c.wire._async) == 0  # each loop's client went with its loop


def test_loops_closed_without_shutting_down_leave_no_connection_once_the_next_loop_comes(encoder_worker):
    url = encoder_worker["url"]
    with EncoderClient(url, timeout=30, shm_prefix=encoder_worker["prefix"]) as c:
        asyncio.run(c.aencode(["x"]))
        fds, clients = open_fds(), redis_clients(url)
        for _ in range(LOOPS):
            loop = asyncio.new_event_loop()
            loop.run_until_complete(c.aencode(["x"]))
            loop.close()  # no shutdown_asyncgens: the client can't close its connections in this loop
        assert len(c.wire._async) == 1  # the last loop's, until a next one comes
        assert redis_clients(url) <= clients + 2  # Redis forgot the earlier loops' connections at once
        gc.collect()  # their descriptors go with their transports
        assert open_fds() <= fds + 2
