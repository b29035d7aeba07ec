"""RQ serializer that speaks msgpack: job data, meta and results never go through pickle."""

from __future__ import annotations

import msgpack


class MsgpackSerializer:
    @staticmethod
    def dumps(obj) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)

    @staticmethod
    def loads(data: bytes):
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
