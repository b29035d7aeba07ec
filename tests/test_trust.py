"""What a Redis reachable by others can send us: zlib bombs are bounded, and result segments are read only from
owners and modes we trust, at the size the handle states (issue 17: D7, S1)."""

from __future__ import annotations

import tracemalloc
import zlib

import pytest

from broker.serializer import InflateLimitExceeded, inflate
from tests.test_broker_e2e import zlib_bomb


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
