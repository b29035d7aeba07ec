"""What a worker's log says while Redis is out of reach, for every thread of the worker that talks to Redis.

An outage is told once it has lasted GRACE_S (a blip the next retry rides out is not an error), in one line that
says why and what to do (broker.protocol.connections.unreachable: a missing password names $EB_REDIS_PASSWORD_FILE and
var/redis/password), then at most every REPEAT_S while it lasts; an INFO line tells when Redis answers again. The
worker keeps retrying all along: under honcho one process's exit stops them all, and the Procfile's Redis may
still be starting, or writing its password file on its first run. A loop that tries again at once (taking jobs)
waits between tries through a `Backoff`; housekeeping tries again at its own interval.

A worker that is stopping takes a closed Redis as part of stopping (Ctrl-C under honcho stops Redis with the
workers): one INFO line, no error. GRACE_S also covers a signal that comes just after Redis closed: the callers
retry within a second, by when the worker knows it is stopping.
"""

from __future__ import annotations

import logging
import threading
import time

from broker.protocol.connections import unreachable

log = logging.getLogger("workers")

GRACE_S = 1.0
REPEAT_S = 10.0
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0  # between tries while Redis is unreachable: a restarted Redis is used within this


class RedisOutage:
    def __init__(self, redis_url: str, stopping: threading.Event):
        self.redis_url = redis_url
        self.stopping = stopping
        self._lock = threading.Lock()
        self._since: float | None = None  # when the current outage began (monotonic); None while Redis answers
        self._told_at: float | None = None  # when it was last told
        self._told_stopping = False

    def failed(self, err: Exception, doing: str) -> None:
        """A command failed to reach Redis while `doing` (e.g. "taking jobs"); the caller retries."""
        with self._lock:
            now = time.monotonic()
            if self._since is None:
                self._since = now
            if self.stopping.is_set():
                if not self._told_stopping:
                    self._told_stopping = True
                    log.info("Redis out of reach while the worker stops (%s): nothing more is taken", err)
                return
            if now - self._since < GRACE_S or (self._told_at is not None and now - self._told_at < REPEAT_S):
                return
            self._told_at = now
            log.error("%s: %s; retrying, out of reach for %.0f s so far", doing, unreachable(self.redis_url, err),
                      now - self._since)

    def answered(self) -> None:
        """A command reached Redis: an outage, if one was on, is over. Cheap while none is."""
        if self._since is None:
            return
        with self._lock:
            if self._since is None:
                return
            log.info("Redis answers again, after %.1f s out of reach", time.monotonic() - self._since)
            self._since = self._told_at = None


class Backoff:
    """One thread's tries at Redis: each outcome told to the worker's RedisOutage, and after a failure a wait
    before the next try, FIRST_BACKOFF_S doubling up to MAX_BACKOFF_S."""

    def __init__(self, outage: RedisOutage, doing: str):
        self.outage = outage
        self.doing = doing  # what the log says the thread was doing, e.g. "taking jobs"
        self.delay = FIRST_BACKOFF_S

    def answered(self) -> None:
        self.outage.answered()
        self.delay = FIRST_BACKOFF_S

    def failed(self, err: Exception) -> None:
        """Tells the outage, then waits before the caller's next try."""
        self.outage.failed(err, self.doing)
        time.sleep(self.delay)
        self.delay = min(2 * self.delay, MAX_BACKOFF_S)
