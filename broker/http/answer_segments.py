"""The HTTP front's answer segments: one fresh segment per shared-memory answer, within a byte budget, each
unlinked by the front once its lifetime is over.

LightX2V's reader (like LightLLM's protocol) opens a segment, copies it and closes it at once, and never unlinks
it: the server owns a segment's lifetime. So the front keeps every segment it made, in the order they expire,
and unlinks each at its expiry (a reader that unlinks first loses nothing: unlinking twice is harmless). The
budget bounds what readers can leave in /dev/shm at once: past it an answer goes as base64 alone, and is
counted. Close() unlinks the live ones (a graceful stop); segments of a front that died are removed by the
sweep (shm.sweep: their creator is gone), which every front runs at start and then periodically.
"""

from __future__ import annotations

import collections
import logging
import time

from shm import SegmentName, ShmError, sweep, unlink_segment, write_segment

log = logging.getLogger("broker.answer_segments")  # the name log filters know it by

DEAD_CREATOR_GRACE_S = 10.0  # see shm.sweep: a creator in another pid namespace looks dead from here


class AnswerSegments:
    def __init__(self, ttl_s: float, prefix: str, max_bytes: int, refused=lambda reason: None):
        """`refused(reason)` is called for each answer that gets no segment: "budget" (max_bytes spent) or
        "space" (/dev/shm full or failing)."""
        self.ttl_s, self.prefix, self.max_bytes, self.refused = ttl_s, prefix, max_bytes, refused
        self._live: collections.deque[tuple[float, str, int]] = collections.deque()  # (expires_at, name, bytes)
        self.live_bytes = 0

    @property
    def live(self) -> int:
        return len(self._live)

    def write(self, data) -> tuple[str, float] | None:
        """(name, expires_at) of a new segment holding `data` (a bytes-like or a uint8 numpy array), or None
        when the budget or /dev/shm has no room for it (then the caller answers in base64)."""
        self.expire()
        size = data.nbytes
        if self.live_bytes + size > self.max_bytes:
            self.refused("budget")
            return None
        try:
            name = write_segment(size, self.ttl_s, self.prefix, [(0, data)])
        except ShmError as e:
            self.refused("space")
            log.warning("no shared memory for this answer (%s); sending base64 alone", e)
            return None
        expires_at = SegmentName.parse(name).expires_at_ms / 1000
        self._live.append((expires_at, name, size))
        self.live_bytes += size
        return name, expires_at

    def expire(self, now: float | None = None) -> int:
        """Unlinks the segments whose lifetime is over; returns how many."""
        now = time.time() if now is None else now
        n = 0
        while self._live and self._live[0][0] <= now:
            _, name, size = self._live.popleft()
            unlink_segment(name)
            self.live_bytes -= size
            n += 1
        return n

    def sweep_orphans(self) -> list[str]:
        """Expired segments of this prefix and those of dead creators (a front or worker that was killed)."""
        return sweep(self.prefix, grace_s=DEAD_CREATOR_GRACE_S)

    def close(self) -> None:
        self.expire(float("inf"))
