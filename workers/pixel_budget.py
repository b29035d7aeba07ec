"""The encoder worker's budget for decoded image pixels in flight (max_image_pixels_in_flight).

A job's decoded images hold memory from decode (intake) until its batch is computed (compute): width x height x
3 bytes each, whatever their encoded size (a flat 4096x4096 PNG is tens of kilobytes on the wire, 48 MiB decoded).
The intake reserves a job's pixels, from its images' headers, before it decodes them; compute releases them once
the job's batch is computed (or has failed). A job that finds no room waits in the intake, undecoded
(workers.stages.intake), so the pixels held never pass the budget.
"""

from __future__ import annotations

import threading


class PixelBudget:
    """A counting budget that never goes negative or past `capacity` (thread-safe). Intake reserves, compute
    releases, the metrics exporter reads `in_use` and `peak`."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"a pixel budget must be at least 1 pixel, got {capacity}")
        self.capacity = capacity
        self._in_use = 0
        self._peak = 0
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def peak(self) -> int:
        """The most pixels held at once since the worker started."""
        return self._peak

    def try_acquire(self, pixels: int) -> bool:
        """Reserves `pixels` if they fit now; False (nothing reserved) if not."""
        self._check(pixels)
        with self._changed:
            if self._in_use + pixels > self.capacity:
                return False
            self._in_use += pixels
            self._peak = max(self._peak, self._in_use)
            return True

    def acquire(self, pixels: int, timeout: float | None = None) -> bool:
        """Reserves `pixels`, waiting up to `timeout` seconds (None: for as long as it takes) for room."""
        self._check(pixels)
        with self._changed:
            if not self._changed.wait_for(lambda: self._in_use + pixels <= self.capacity, timeout):
                return False
            self._in_use += pixels
            self._peak = max(self._peak, self._in_use)
            return True

    def release(self, pixels: int) -> None:
        """Gives back pixels reserved before; giving back more than is held is a bug, and raises."""
        if pixels < 0:
            raise ValueError(f"cannot release {pixels} pixels")
        with self._changed:
            if pixels > self._in_use:
                raise RuntimeError(f"releasing {pixels} pixels while {self._in_use} are held: a job's pixels were "
                                   "released twice")
            self._in_use -= pixels
            self._changed.notify_all()

    def wait_for_room(self, pixels: int, timeout: float) -> bool:
        """Whether `pixels` would fit now, waiting up to `timeout` seconds for releases to make room; reserves
        nothing (the caller then tries `try_acquire`)."""
        self._check(pixels)
        with self._changed:
            return self._changed.wait_for(lambda: self._in_use + pixels <= self.capacity, timeout)

    def _check(self, pixels: int) -> None:
        if pixels < 0:
            raise ValueError(f"cannot reserve {pixels} pixels")
        if pixels > self.capacity:  # would wait forever: the caller refuses such a job instead
            raise ValueError(f"{pixels} pixels can never fit a budget of {self.capacity}")
