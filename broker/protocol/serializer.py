"""RQ serializer that speaks msgpack: job data, meta and results never go through pickle. And zlib inflation
with a bound, for records read from Redis (a few KB of zlib can inflate to GBs)."""

from __future__ import annotations

import zlib

import msgpack


class MsgpackSerializer:
    @staticmethod
    def dumps(obj) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)

    @staticmethod
    def loads(data: bytes):
        return msgpack.unpackb(data, raw=False, strict_map_key=False)


class InflateLimitExceeded(ValueError):
    """zlib data that inflates past the bound it was read with."""


def inflate(data: bytes, max_bytes: int) -> bytes:
    """`data` (zlib) inflated, never past `max_bytes`: at most max_bytes + 1 bytes are ever produced, so a zlib
    bomb costs no more memory than a record of the largest size allowed. Raises InflateLimitExceeded past the
    bound, zlib.error for data that is not zlib or is cut short."""
    d = zlib.decompressobj()
    out = d.decompress(data, max_bytes + 1)
    if len(out) > max_bytes:
        raise InflateLimitExceeded(f"{len(data)} bytes of zlib inflate past {max_bytes} bytes")
    if not d.eof:
        raise zlib.error("incomplete or truncated zlib stream")
    return out
