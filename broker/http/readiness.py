"""Whether the front can serve: Redis answers and a live worker serves its queue. /health, /liveness and
/readiness say so; while Redis answers and no live worker serves the queue, /generate is refused at once with 503
and /health's reason (looked at in the background, SERVING_CHECK_S, so a served request pays no extra round
trip), rather than held until its timeout."""

from __future__ import annotations

import asyncio
import time

from broker.client import EncoderClient
from broker.errors import BrokerError
from broker.http.config import HttpFrontConfig
from broker.protocol.connections import redacted, unreachable

HEALTH_TIMEOUT_S = 2.0
SERVING_CHECK_S = 0.5  # how often the front looks whether a live worker serves its queue (Readiness.watch)


class Readiness:
    """What /health tells of the front's queue, and whether /generate is refused at once for want of a worker."""

    def __init__(self, client: EncoderClient, cfg: HttpFrontConfig):
        self.client = client
        self.cfg = cfg
        # /health's reason while Redis answers and no live worker serves the queue (then /generate is refused at
        # once), else None; kept fresh by `watch`.
        self._no_worker: str | None = None
        self._redis_run_id: str | None = None  # the Redis last looked at, and when another one took its place
        self._redis_changed_at = float("-inf")

    async def check(self) -> dict:
        """What /health tells: whether Redis answers, the queue's depth and live workers, and a `reason` when the
        front can't serve. Notes whether to refuse /generate at once: only while Redis answers and no live worker
        serves the queue. Not while Redis is out of reach (the client rides out a restart), nor for
        worker_stale_s after another Redis took its place (restarted empty, a replica promoted): its workers
        register again within a heartbeat, and a request held meanwhile is served."""
        body = {"redis": False, "queue_depth": None, "live_workers": 0}
        try:
            state = await asyncio.wait_for(self.client.aqueue_state(self.cfg.worker_stale_s), HEALTH_TIMEOUT_S)
        except Exception as e:  # any failure to answer means "Redis does not answer"
            if not str(e):
                body["reason"] = f"cannot reach Redis at {redacted(self.cfg.redis_url)}: no answer within " \
                                 f"{HEALTH_TIMEOUT_S} s"
            else:
                body["reason"] = str(e) if isinstance(e, BrokerError) else unreachable(self.cfg.redis_url, e)
            self._no_worker = None
            return body
        body.update(redis=True, queue_depth=state.depth, live_workers=state.live_workers)
        now = time.monotonic()
        if self._redis_run_id not in (None, state.redis_run_id):
            self._redis_changed_at = now
        self._redis_run_id = state.redis_run_id
        if not state.live_workers:
            body["reason"] = f"no live worker serves queue {self.cfg.queue!r}"
        settled = now - self._redis_changed_at >= self.cfg.worker_stale_s
        self._no_worker = body.get("reason") if settled else None
        return body

    async def watch(self) -> None:
        """Keeps what `refusal` answers fresh (check() every SERVING_CHECK_S), until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(SERVING_CHECK_S)

    async def refusal(self) -> str | None:
        """/health's reason if no live worker serves the queue now, else None. Free while one does; while none
        did at the last look, looked at again, so a worker that has just started serves this request."""
        if self._no_worker is None:
            return None
        await self.check()
        return self._no_worker
