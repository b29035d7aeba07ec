"""Segment names: `/<prefix>.<pid>.<expires_at_ms>.<token>`.

The creator's pid lets a sweeper spot segments whose writer died; the expiry (ms since the epoch) bounds how
long a slow or dead reader can leave one behind; the 16-hex-char random token makes every name unique, so a
name is never reused and removing one by name can't hit a newer segment.
"""
from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass

SHM_DIR = "/dev/shm"  # where Linux exposes POSIX shared memory objects (name without the leading "/")
DEFAULT_PREFIX = "eb"

_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_NAME_RE = re.compile(
    r"/?(?P<prefix>[A-Za-z0-9_-]{1,32})\.(?P<pid>[1-9][0-9]{0,9})\.(?P<exp>[0-9]{1,15})\.(?P<token>[0-9a-f]{16})"
)


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"shm prefix must be 1-32 chars of [A-Za-z0-9_-] (no dots or slashes), got {prefix!r}")
    return prefix


@dataclass(frozen=True, slots=True)
class SegmentName:
    pid: int
    expires_at_ms: int
    token: str
    prefix: str = DEFAULT_PREFIX

    @classmethod
    def new(cls, ttl_s: float, prefix: str = DEFAULT_PREFIX) -> SegmentName:
        """A fresh name for this process, expiring ttl_s seconds from now."""
        return cls(os.getpid(), int((time.time() + ttl_s) * 1000), secrets.token_hex(8), check_prefix(prefix))

    def format(self) -> str:
        return f"/{self.prefix}.{self.pid}.{self.expires_at_ms}.{self.token}"

    @classmethod
    def parse(cls, name: str, prefix: str | None = None) -> SegmentName | None:
        """Parse a name with or without its leading "/"; None if it is not one of ours (or not `prefix`'s)."""
        m = _NAME_RE.fullmatch(name)
        if m is None or (prefix is not None and m["prefix"] != prefix):
            return None
        return cls(int(m["pid"]), int(m["exp"]), m["token"], m["prefix"])

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) * 1000 >= self.expires_at_ms
