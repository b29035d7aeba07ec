"""The intake stage of the encoder worker: takes jobs, checks and tokenizes them, and forms the next batch while
the device runs the current one (Links.ready holds exactly one). Bad jobs fail here, alone.

An image job reserves its decoded pixels (workers.pixel_budget, max_image_pixels_in_flight) before its images are
decoded. Without room it waits here, undecoded, in order, until compute releases enough, or until its client's
deadline passes (then it fails): jobs without images pass it by, so text keeps flowing.

Intake uses the encoder's tokenizing half only (`tokenize`, and its workers.images.ImagePreprocessor, whose pool
prepares several image jobs side by side); compute runs its forward half."""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable

from broker.errors import BrokerError, InvalidRequest, PromptTooLong
from broker.protocol.schemas import EncodeRequest
from workers.batching import BatchPolicy
from workers.config import EncoderWorkerConfig
from workers.encoders.base import TokenizedPrompts
from workers.images import ImagePreprocessor, per_prompt_images
from workers.job_source import CONNECTION_ERRORS, JobSource, StatsUpdate, TakenJob
from workers.outage import Backoff, RedisOutage
from workers.stages.links import LAUNCH_WAIT_S, Links
from workers.stages.types import JobBatch, PreparedJob

log = logging.getLogger("workers")

# Longest the intake waits for room for a waiting image job before it looks at the queue (for jobs without
# images) and at the waiting jobs' deadlines again.
ROOM_WAIT_S = 0.02
EXPIRED_WAITING = ("client deadline passed before compute, while the job waited for room for its images "
                   "(max_image_pixels_in_flight): not computed")


class Intake:
    def __init__(self, source: JobSource, tokenize: Callable[..., TokenizedPrompts], images: ImagePreprocessor,
                 config: EncoderWorkerConfig, links: Links, outage: RedisOutage):
        """`tokenize` and `images`: the encoder's (workers.encoders.base.EncoderBase); `outage`: the worker's, what
        its log says while Redis is out of reach."""
        self.source = source
        self.outage = outage
        self.tokenize = tokenize
        self.images = images
        self.config = config
        self.links = links
        self.policy = BatchPolicy(config.max_batch_tokens, config.max_batch_requests, config.max_wait_ms)
        self._pending: collections.deque[PreparedJob] = collections.deque()  # started, not yet in a batch
        # started image jobs, undecoded, with the pixels they need: waiting for room in links.pixels
        self._waiting: collections.deque[tuple[TakenJob, int]] = collections.deque()
        self._forming = JobBatch()

    def run(self) -> None:
        """The intake thread: batches to `links.ready` until the worker stops, then what it holds, then None."""
        backoff = Backoff(self.outage, "taking jobs")
        while not self.links.stopping.is_set():
            try:
                batch = self.next_batch()
                backoff.answered()
            except CONNECTION_ERRORS as e:
                backoff.failed(e)
                continue
            except Exception:
                log.exception("intake failed; retrying")
                time.sleep(0.5)
                continue
            if batch is not None:
                self.links.ready.put(batch)
                time.sleep(0)  # lets the woken compute thread take the GIL now, not a switch interval later
        while True:  # no started job is dropped: those waiting for room get it as compute goes on
            try:
                self.admit_waiting()
            except Exception:  # Redis gone while failing expired ones: recovery retries those
                log.exception("failing jobs past their deadline while stopping")
            if (batch := self._close(self._forming)) is not None:
                self.links.ready.put(batch)
            elif self._waiting:
                self.links.pixels.wait_for_room(self._waiting[0][1], ROOM_WAIT_S)
            else:
                break
        self.links.ready.put(None)

    def next_batch(self) -> JobBatch | None:
        """Grows the forming batch from pending jobs and the queue until the policy closes it; None when no job
        came within a second (or the worker stops)."""
        batch = self._forming
        while not self.links.stopping.is_set():
            self.admit_waiting()
            self._fill(batch)
            # Jobs waiting for room close the batch at once: room is freed only as batches are computed.
            if batch.jobs and (self._pending or self._waiting or self.policy.should_close(
                    len(batch.jobs), batch.tokens, batch.waited_ms(), self.links.device_idle.is_set())):
                break
            room = self.policy.max_batch_requests - len(batch.jobs) - len(self._waiting)
            if not batch.jobs and not self._waiting:
                taken = self.take(room, wait=True)
                if not taken:
                    return None
                self.admit(taken)
            elif room > 0 and (taken := self.take(room)):
                self.admit(taken)
            elif not batch.jobs:  # only jobs waiting for room, which computing batches ahead frees
                self.links.pixels.wait_for_room(self._waiting[0][1], ROOM_WAIT_S)
            # Nothing queued: wait briefly for more, polling. (Redis checks blocking-command timeouts only about
            # every 100 ms, so a BLPOP of 2 ms would wait up to 100.) While the device is busy the polls are
            # short, so the batch closes the moment the device frees up.
            elif self.links.device_idle.is_set():
                time.sleep(min(self.policy.wait_left_ms(batch.waited_ms()), 1.0) / 1e3)
            else:
                self.links.device_idle.wait(1e-3)
        return self._close(batch)

    def take(self, room: int, wait: bool = False) -> list[TakenJob]:
        """Up to `room` jobs, started in Redis and from now on heart-beaten by housekeeping (Links.held); with
        `wait`, after waiting up to a second for a client's enqueue to wake this worker."""
        ttl = self.config.job_heartbeat_ttl_s
        taken = self.source.wait_and_take(room, ttl, 1.0) if wait else self.source.take(room, ttl)
        if taken:
            self.links.held.put(("hold", taken))
        return taken

    def _fill(self, batch: JobBatch) -> None:
        while self._pending and self.policy.fits(len(batch.jobs), batch.tokens, self._pending[0].n_tokens):
            batch.add(self._pending.popleft())

    def _close(self, batch: JobBatch) -> JobBatch | None:
        self._fill(batch)
        if not batch.jobs:
            return None
        self._forming = JobBatch()
        return batch

    def admit(self, taken: list[TakenJob]) -> None:
        """Checks and tokenizes taken (already started) jobs: the good ones wait for a batch, the bad ones fail
        at once. An image job first reserves the pixels its images decode to; without room it waits for
        `admit_waiting`, behind the image jobs already waiting."""
        failed = [(t, t.error) for t in taken if t.error is not None]
        ready: list[tuple[TakenJob, int]] = []
        budget = self.links.pixels
        for t in taken:
            if t.error is not None:
                continue
            try:
                pixels = self.pixels_of(t.request)
            except Exception as e:  # refused before decoding, as `prepare` would refuse it
                if not isinstance(e, BrokerError):
                    log.exception("job %s: reading its images' headers failed", t.job_id)
                failed.append((t, f"{type(e).__name__}: {e}"))
                continue
            if pixels > budget.capacity:
                failed.append((t, f"InvalidRequest: the job's images decode to {pixels} pixels, over "
                                  f"max_image_pixels_in_flight {budget.capacity} (what this worker holds decoded "
                                  "at once): send fewer or smaller images, or raise max_image_pixels_in_flight"))
            elif pixels == 0 or (not self._waiting and budget.try_acquire(pixels)):
                ready.append((t, pixels))
            else:
                self._waiting.append((t, pixels))
        self._prepare(ready, failed)
        for t in taken:
            if t.enqueued_at is not None:
                self.policy.arrived(t.enqueued_at)
        self._fail(failed)

    def admit_waiting(self) -> None:
        """The image jobs waiting for room: those whose client's deadline passed fail; then, in order, those
        that now fit reserve their pixels and are prepared."""
        if not self._waiting:
            return
        now, budget = time.time(), self.links.pixels
        expired, ready, still = [], [], collections.deque()
        for t, pixels in self._waiting:
            if 0 < t.request.deadline < now:
                expired.append((t, EXPIRED_WAITING))
            elif not still and budget.try_acquire(pixels):
                ready.append((t, pixels))
            else:
                still.append((t, pixels))
        self._waiting = still
        failed: list[tuple[TakenJob, str]] = []
        self._prepare(ready, failed)
        self._fail(expired + failed, expired=len(expired))

    def pixels_of(self, req: EncodeRequest) -> int:
        """The pixels the request's images decode to, read from their headers (0 for a job without images); raises
        what `prepare` would raise before decoding them."""
        if req.task != "i2i" or not req.images:
            return 0
        self.check(req)
        return self.images.declared_pixels(per_prompt_images(req.images, len(req.prompts)))

    def _prepare(self, jobs: list[tuple[TakenJob, int]], failed: list) -> None:
        """Tokenizes `jobs` (with the pixels each has reserved) into `_pending`; a failed one gives its pixels
        back and goes to `failed`. Several image jobs are prepared side by side in the image pool: decoding and
        preprocessing a picture takes a while (RESULTS.md, i2i run 1), and PIL and numpy let go of the GIL."""
        if sum(1 for t, _ in jobs if t.request.images) > 1:
            calls = [self.images.submit(self.prepare, t.request) for t, _ in jobs]
        else:
            calls = [None] * len(jobs)
        for (t, pixels), call in zip(jobs, calls):
            self.links.launched.wait(LAUNCH_WAIT_S)
            try:
                tokens = call.result() if call is not None else self.prepare(t.request)
            except Exception as e:  # a job the tokenizer chokes on fails alone, like one it refuses
                if pixels:
                    self.links.pixels.release(pixels)
                if not isinstance(e, BrokerError):
                    log.exception("job %s: preparing its request failed", t.job_id)
                failed.append((t, f"{type(e).__name__}: {e}"))
            else:
                self._pending.append(PreparedJob(t, tokens, pixels))

    def _fail(self, failed: list[tuple[TakenJob, str]], expired: int = 0) -> None:
        if not failed:
            return
        try:
            prompts = sum(len(getattr(t.request, "prompts", ())) for t, _ in failed)  # 0 if unparsed
            counts = {"failed": len(failed), "failed_prompts": prompts}
            if expired:
                counts["expired_before_compute"] = expired
            self.source.record([], failed, self.config.result_ttl_s, StatsUpdate(counts))
        finally:  # recorded, or left to recovery once their heartbeat lapses
            self.links.held.put(("release", [t for t, _ in failed]))
        for t, reason in failed:
            log.warning("job %s failed: %s", t.job_id, reason)

    def check(self, req: EncodeRequest) -> None:
        """The checks that bound what tokenizing the request costs."""
        if len(req.prompts) > self.config.max_prompts_per_job:
            raise InvalidRequest(f"{len(req.prompts)} prompts in one job, over max_prompts_per_job "
                                 f"{self.config.max_prompts_per_job}")
        for i, p in enumerate(req.prompts):
            if len(p) > self.config.max_prompt_chars:
                raise PromptTooLong(f"prompt {i} is {len(p)} characters, over max_prompt_chars "
                                    f"{self.config.max_prompt_chars}")

    def prepare(self, req: EncodeRequest) -> TokenizedPrompts:
        """The request's token ids, after the checks that bound what tokenizing it costs."""
        self.check(req)
        tokens = self.tokenize(req.prompts, req.task, raw=req.raw, images=req.images or None)
        if req.max_tokens is not None:
            for i, n in enumerate(tokens.text_lengths):
                if n > req.max_tokens:
                    raise PromptTooLong(f"prompt {i} is {n} tokens, over the job's max_tokens {req.max_tokens}")
        return tokens
