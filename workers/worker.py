"""The encoder worker: jobs from many clients in token-budget batches, the device kept busy.

Three stages overlap, each in its own thread (TEI's shape): intake takes jobs, checks and tokenizes them, marks
them started and forms the next batch while the device runs the current one (exactly one batch waits ready);
the main thread runs the encoder (workers.batch_runner); output writes segments / blobs and records results (one
script call a batch, then one for its stats); a batch that is all the worker holds, the main thread delivers
itself, leaving the record to a recorder thread when every client has its result by doorbell. An idle worker rung by a client on its host (broker.doorbell) runs the job at once and claims it from
the queue while it runs (see _take_rung). While the main thread launches a batch's kernels, the other two hold
their per-job Python work (see BatchRunner.launched).
A housekeeping thread heartbeats, keeps held jobs' deadlines fresh, recovers dead workers' jobs and sweeps
segments. Bad jobs fail alone; a failing batch fails its jobs; Redis restarts are ridden out.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from broker.doorbell import Doorbell, Ringer, advertise_bell, worker_bells_key
from broker.enqueue import queue_bound_key
from broker.errors import BrokerError, InvalidRequest, PromptTooLong
from broker.host import host_id
from shm import sweep, unlink_segment
from workers.batch_runner import Batch, BatchRunner, Encoded, PreparedJob
from workers.batching import BatchPolicy
from workers.config import EncoderWorkerConfig
from workers.devices import describe as describe_device
from workers.encoders.base import TokenizedBatch
from workers.encoding_cache import EncodingCache
from workers.images import ImageLimits
from workers.job_source import TakenJob
from workers.result_writer import ResultWriter, layout_of
from workers.serve_loop import CONNECTION_ERRORS, ServeLoop
from workers.stats import WorkerStats

log = logging.getLogger("workers")


# How often intake, waiting to hand a batch to the busy compute thread, hands on jobs rung to this worker.
HAND_ON_POLL_S = 0.002
# A rung job runs ahead of its claim only if the ring is this fresh when read: an idle worker reads a ring within
# ~0.1 ms; an older one waited while the worker was busy, and its job may well be taken by then (a wasted run).
RUN_AHEAD_WITHIN_S = 0.002
RECENT_JOBS = 4096  # job ids this worker took, kept to tell late rings for them apart

# Longest the intake and output threads hold back, per job, while the compute thread launches kernels
# (BatchRunner.launched): a bound, in case a launch phase includes waiting for the device.
LAUNCH_WAIT_S = 0.05


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


class EncoderWorker(ServeLoop):
    def __init__(self, config: EncoderWorkerConfig, encoder):
        super().__init__(config.redis_url, config.queue, config.max_payload_bytes)
        self.config = config
        self.encoder = encoder
        self.device = describe_device(str(encoder.device))
        if hasattr(encoder, "configure_images"):
            encoder.configure_images(ImageLimits(config.max_images_per_job, config.max_image_pixels,
                                                 config.max_image_side), config.image_cache_max_bytes)
        self.maintenance_interval_s = config.sweep_interval_s
        self.heartbeat_ttl_s = config.job_heartbeat_ttl_s
        self.policy = BatchPolicy(config.max_batch_tokens, config.max_batch_requests, config.max_wait_ms)
        self.runner = BatchRunner(encoder, EncodingCache(config.cache_max_bytes), config.max_batch_tokens)
        self.stats = WorkerStats(config.queue, self.name)
        self.writer = ResultWriter(host_id(), config.result_ttl_s, self.name, config.shm_prefix,
                                   config.shm_max_bytes)
        self.ringer = Ringer()
        self.bell = Doorbell()  # clients on this host ring it with their jobs (broker.doorbell)
        self._ready: queue.Queue[Batch | None] = queue.Queue(maxsize=1)  # exactly one batch prefetched
        self._done: queue.Queue[Encoded | None] = queue.Queue(maxsize=2)
        self._device_idle = threading.Event()
        self._device_idle.set()
        self._pending: collections.deque[PreparedJob] = collections.deque()  # started, not yet in a batch
        self._forming = Batch()
        self._held: dict[str, TakenJob] = {}  # every started job not yet recorded: its heartbeat is ours
        self._recently_taken: collections.OrderedDict[str, None] = collections.OrderedDict()  # intake's only
        self._held_lock = threading.Lock()
        self._delivering = threading.Lock()  # held by whichever thread delivers a batch (see _deliver_alone)
        self._itemsize = torch.empty((), dtype=encoder.dtype).element_size()
        self._output_finished = threading.Event()
        self._to_record: queue.Queue[HandedOut | None] = queue.Queue()  # see _deliver_logged
        self._awaiting_record = 0  # jobs of _held whose clients have their results, on _to_record
        self._recorder_finished = threading.Event()
        self._image_pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="images")

    def describe(self) -> str:
        return f"queue {self.queue!r} with the {self.encoder.backend} encoder on {self.encoder.device}"

    # -- lifecycle -------------------------------------------------------------------------------------
    def run(self) -> None:
        self.install_signal_handlers()
        log.info("worker %s serving %s", self.name, self.describe())
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                self._publish_bound(pipe)  # before registering: a client that sees the worker sees its bound
                pipe.execute()
        except CONNECTION_ERRORS:
            pass  # the housekeeping thread keeps trying
        threads = [threading.Thread(target=self._intake_loop, name="intake", daemon=True),
                   threading.Thread(target=self._output_loop, name="output", daemon=True),
                   threading.Thread(target=self._recorder_loop, name="recorder", daemon=True),
                   threading.Thread(target=self._housekeeping_loop, name="housekeeping", daemon=True)]
        for t in threads:
            t.start()
        self._compute_loop()
        self._output_finished.wait()
        self.unregister()

    def _publish_bound(self, pipe) -> None:
        """Clients' admission reads this (broker.enqueue); it lapses when no worker is left to refresh it."""
        if self.config.max_queue_depth > 0:
            pipe.set(queue_bound_key(self.queue), self.config.max_queue_depth,
                     ex=max(10, int(self.maintenance_interval_s * 3)))

    def maintain(self) -> None:
        removed = sweep(self.config.shm_prefix, grace_s=min(self.config.result_ttl_s, 10))
        if removed:
            log.info("swept %d expired or orphaned segment(s)", len(removed))

    def _housekeeping_loop(self) -> None:
        interval = max(0.2, min(1.0, self.heartbeat_ttl_s / 4))
        down = False
        while not self._output_finished.is_set():
            try:
                self.housekeeping()
                with self._held_lock:
                    held = list(self._held.values())
                with self.connection.pipeline(transaction=False) as pipe:
                    self.heartbeat(pipe)
                    self.source.refresh(held, self.heartbeat_ttl_s, pipe)
                    self._publish_bound(pipe)
                    if not self._stop:
                        advertise_bell(pipe, self.queue, self.bell.name, self.writer.host_id)
                    pipe.execute()
                if down:
                    log.info("Redis is back")
                down = False
            except CONNECTION_ERRORS as e:
                if not down:
                    log.error("Redis unreachable (%s); retrying", e)
                down = True
                self._registered = False
                self._last_maintenance = 0.0
            except Exception:
                log.exception("housekeeping failed; retrying")
            self._output_finished.wait(interval)

    # -- intake ----------------------------------------------------------------------------------------
    def _intake_loop(self) -> None:
        backoff = 0.5
        while not self._stop:
            try:
                batch = self._form_batch()
                backoff = 0.5
            except CONNECTION_ERRORS as e:
                log.error("Redis unreachable while taking jobs (%s); retrying in %.1fs", e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            except Exception:
                log.exception("intake failed; retrying")
                time.sleep(0.5)
                continue
            if batch is not None:
                self._put_ready(batch)
                time.sleep(0)  # lets the woken compute thread take the GIL now, not a switch interval later
        # Stopping: what is formed or pending still runs, so no started job is dropped (a wait under way may
        # still take some). Jobs rung to this worker from now on are left to the others, woken through Redis.
        try:
            self.connection.hdel(worker_bells_key(self.queue), self.bell.name)
            rung = self.bell.drain()
            self.bell.close()  # a client's ring now fails, and the client wakes a worker through Redis
            self.source.hand_on([ring.job_id for ring in rung])
            self._admit(self.source.end_wait(block=True))
        except CONNECTION_ERRORS:
            pass  # jobs it took are started: recovery retries them; jobs rung and not taken: see job_source
        while self._forming.jobs or self._pending:
            batch, self._forming = self._forming, Batch()
            while self._pending and self.policy.fits(len(batch.jobs), batch.tokens, self._pending[0].n_tokens):
                batch.add(self._pending.popleft())
            self._ready.put(batch)
        self._ready.put(None)

    def _form_batch(self) -> Batch | None:
        """Grows the forming batch from pending jobs and the queue until the policy closes it."""
        batch = self._forming
        while not self._stop:
            while self._pending and self.policy.fits(len(batch.jobs), batch.tokens, self._pending[0].n_tokens):
                batch.add(self._pending.popleft())
            if batch.jobs and (self._pending or self.policy.should_close(
                    len(batch.jobs), batch.tokens, batch.waited_ms(), self._device_idle.is_set())):
                break
            room = self.policy.max_batch_requests - len(batch.jobs)
            if batch.jobs:
                self._take_rung()  # busy: hands them on (the take below may well have them)
                taken = self.source.end_wait() or []  # a wait begun while idle may have taken jobs since
                taken += self.source.take(None, room - len(taken), self.heartbeat_ttl_s)
                if taken:
                    self._admit(taken)
                    continue
                # Nothing queued: wait briefly for more, polling. (Redis checks blocking-command timeouts only
                # about every 100 ms, so a BLMOVE of 2 ms would wait up to 100.) While the device is busy the
                # polls are short, so the batch closes the moment the device frees up.
                if self._device_idle.is_set():
                    time.sleep(min(self.policy.wait_left_ms(batch.waited_ms()), 1.0) / 1e3)
                else:
                    self._device_idle.wait(1e-3)
            else:
                taken = self._wait_for_jobs(room)
                if not taken:
                    return None
                self._admit(taken)
        if not batch.jobs:
            return None
        self._forming = Batch()
        return batch

    def _put_ready(self, batch: Batch) -> None:
        """Hands the batch to the compute thread. While that waits (the device busy, a batch ready), jobs rung to
        this worker are handed on to the others rather than left unread."""
        while True:
            try:
                self._ready.put(batch, timeout=HAND_ON_POLL_S)
                return
            except queue.Full:
                try:
                    self._take_rung()
                except CONNECTION_ERRORS as e:
                    log.error("Redis unreachable while handing on rung jobs (%s)", e)

    def _wait_for_jobs(self, room: int) -> list[TakenJob]:
        """Blocks until Redis wakes this worker for jobs (as `wait_and_take`) or a client on this host rings it
        with some (see _take_rung). The timeout only bounds stop checks."""
        self.source.begin_wait(room, self.heartbeat_ttl_s, 1.0)
        poller = select.poll()
        poller.register(self.bell, select.POLLIN)
        poller.register(self.source.wait_socket(), select.POLLIN)
        poller.poll(1500)
        taken = self._take_rung()
        taken += self.source.end_wait() or []
        return taken

    def _idle(self) -> bool:
        return (self._device_idle.is_set() and self._ready.empty() and not self._pending
                and not self._forming.jobs)

    def _take_rung(self) -> list[TakenJob]:
        """Jobs clients on this host rang this worker with (a rung job wakes no worker through Redis,
        broker.doorbell). Busy, the worker hands them on: a wake-up token through Redis for each (at once, or at
        the job's enqueue), which any worker answers, this one included. Idle, it runs at once the jobs whose
        rings carry their requests and were heard at once, then claims them all from the queue while they run:
        a lone request pays no Redis hop before the encoder. Only claimed jobs' results are delivered (Redis's
        record decides what ran: a ring's request must be the queued one's bytes). Rings for jobs this worker
        already took are dropped. Returns the claimed jobs not run ahead, to admit as any taken job."""
        rings = [ring for ring in self.bell.drain() if ring.job_id not in self._recently_taken]  # else: late
        if not rings:
            return []
        if not self._idle():
            self.source.hand_on([ring.job_id for ring in rings])
            return []
        job_ids = [ring.job_id for ring in rings]
        packed = self.source.pack_claim(job_ids, self.heartbeat_ttl_s)
        now = time.time()
        ahead = self._run_ahead([ring for ring in rings if now - ring.sent_at <= RUN_AHEAD_WITHIN_S])
        taken = []
        try:
            taken = self.source.claim(job_ids, self.heartbeat_ttl_s, packed)
        finally:  # claims not heard of (Redis lost) leave their jobs started: recovery retries them
            if ahead is not None:
                taken = self._settle_claims(ahead, taken)
        return taken

    def _run_ahead(self, rings) -> Batch | None:
        """A batch of the rung requests, handed to the (idle) compute thread before they are claimed."""
        batch = Batch(claims_settled=threading.Event())
        for ring in rings:
            if not ring.request:
                continue  # too large to ring (images): read from Redis once claimed
            try:
                request = self.source.parse_request(ring.request).validate()
                job = PreparedJob(TakenJob(ring.job_id, "", request=request, rung=True, payload=ring.request),
                                  self._tokenize_request(request))
            except Exception:  # BrokerError and the like: the claimed job's own checks report it
                continue
            if self.policy.fits(len(batch.jobs), batch.tokens, job.n_tokens):
                batch.add(job)
        if not batch.jobs:
            return None
        self._ready.put_nowait(batch)  # idle: nothing else is ready (only this thread puts)
        time.sleep(0)  # lets the woken compute thread take the GIL now, not when the claim's send lets go of it
        return batch

    def _settle_claims(self, ahead: Batch, taken: list[TakenJob]) -> list[TakenJob]:
        """Each job run ahead becomes the job claimed (started, held) or lost; the claimed jobs left over."""
        claimed = {t.job_id: t for t in taken}
        started = []
        for p in ahead.jobs:
            t = claimed.get(p.taken.job_id)
            if t is not None and t.error is None and t.payload == p.taken.payload:
                t.taken_at = p.taken.taken_at
                p.taken = t
                started.append(p)
                del claimed[t.job_id]
            else:
                p.lost = True
        self._note_taken(p.taken for p in started)
        with self._held_lock:
            self._held.update((p.taken.job_id, p.taken) for p in started)
        for p in started:
            if p.taken.enqueued_at is not None:
                self.policy.arrived(p.taken.enqueued_at)
        ahead.claims_settled.set()
        return list(claimed.values())

    def _note_taken(self, taken) -> None:
        for t in taken:
            self._recently_taken[t.job_id] = None
        while len(self._recently_taken) > RECENT_JOBS:
            self._recently_taken.popitem(last=False)

    def _admit(self, taken: list[TakenJob]) -> None:
        """Checks and tokenizes taken (already started) jobs: the good ones wait for a batch, the bad ones fail
        at once."""
        self._note_taken(taken)
        prepared, failed = [], [(t, t.error) for t in taken if t.error is not None]
        ok = [t for t in taken if t.error is None]
        # Image jobs spend tens of ms a picture decoding and preprocessing (PIL and numpy let go of the GIL):
        # several at once go through a thread pool.
        if sum(1 for t in ok if t.request.images) > 1:
            results = [self._image_pool.submit(self._tokenize_request, t.request) for t in ok]
        else:
            results = [None] * len(ok)
        for t, future in zip(ok, results):
            self.runner.launched.wait(LAUNCH_WAIT_S)
            try:
                prepared.append(PreparedJob(t, future.result() if future is not None
                                            else self._tokenize_request(t.request)))
            except BrokerError as e:
                failed.append((t, f"{type(e).__name__}: {e}"))
        with self._held_lock:
            self._held.update((p.taken.job_id, p.taken) for p in prepared)
        for t in taken:
            if t.enqueued_at is not None:
                self.policy.arrived(t.enqueued_at)
        self._pending.extend(prepared)
        if failed:
            self.source.record([], failed, self.config.result_ttl_s, self.stats.failures(len(failed)))
            for t, reason in failed:
                log.warning("job %s failed: %s", t.job_id, reason)

    def _tokenize_request(self, req: EncodeRequest) -> TokenizedBatch:
        if len(req.prompts) > self.config.max_prompts_per_job:
            raise InvalidRequest(f"{len(req.prompts)} prompts in one job, over max_prompts_per_job "
                                 f"{self.config.max_prompts_per_job}")
        batch = self.encoder.tokenize(req.prompts, req.task, raw=req.raw, images=req.images or None)
        if req.max_tokens is not None:
            for i, n in enumerate(batch.text_lengths):
                if n > req.max_tokens:
                    raise PromptTooLong(f"prompt {i} is {n} tokens, over the job's max_tokens {req.max_tokens}")
        return batch

    # -- compute ---------------------------------------------------------------------------------------
    def _compute_loop(self) -> None:
        while True:
            self._device_idle.set()
            batch = self._ready.get()
            if batch is None:
                break
            self._device_idle.clear()
            enc = self.runner.run(batch, while_device_runs=lambda: self._reserve_segments(batch))
            if not self._deliver_alone(enc):
                self._done.put(enc)
        self._done.put(None)

    def _reserve_segments(self, batch: Batch) -> None:
        """Creates the batch's shared-memory result segments while the device computes it: their memory
        allocation (~0.1 ms for a 500 KB result on an H100 host) is then off the results' path. The output sizes
        are known from the token counts; a result of another size gets a segment of its own at delivery."""
        try:
            for p in batch.jobs:
                if self.writer.goes_by_shm(p.taken.request):
                    shapes = [[n, self.encoder.hidden_size] for n in p.tokens.output_lengths]
                    nbytes = layout_of(shapes, self._itemsize)[2]
                    name = self.writer.reserve(p.taken.job_id, nbytes)
                    if name is not None:
                        p.reserved = (name, nbytes)
        except Exception:  # only a head start: delivery writes segments of its own without it
            log.exception("reserving result segments failed")

    @staticmethod
    def _release_reserved(batch: Batch) -> None:
        for p in batch.jobs:
            if p.reserved is not None:
                unlink_segment(p.reserved[0])
                p.reserved = None

    def _deliver_alone(self, enc: Encoded) -> bool:
        """Delivers the batch on this thread when it is all the work the worker holds: no other job started,
        the output thread idle. A lone request then skips a hand-over to a sleeping thread (a wake-up on its
        path); with more work around, the output thread delivers while the device runs the next batch."""
        if not self._delivering.acquire(blocking=False):
            return False
        try:
            jobs = enc.batch.settle()
            with self._held_lock:
                alone = len(self._held) - self._awaiting_record == len(jobs)
            if not alone or not self._done.empty():
                return False
            self._device_idle.set()  # a job arriving now closes its batch at once; it runs after this delivery
            self._deliver_logged(enc, record_later=True)
            return True
        finally:
            self._delivering.release()

    # -- output ----------------------------------------------------------------------------------------
    def _output_loop(self) -> None:
        while True:
            enc = self._done.get()
            if enc is None:
                break
            with self._delivering:
                self._deliver_logged(enc)
        self._to_record.put(None)
        self._recorder_finished.wait()
        self._output_finished.set()

    def _recorder_loop(self) -> None:
        """Records the batches whose clients all have their results by doorbell (see _deliver_logged)."""
        while (handed := self._to_record.get()) is not None:
            self._record_logged(handed, deferred=True)
        self._recorder_finished.set()

    def _deliver_logged(self, enc: Encoded, record_later: bool = False) -> None:
        """Delivers a batch; failures are logged, never raised (the jobs stay started: recovery retries them).
        With `record_later`, a batch whose clients all have their results by doorbell is recorded in Redis by
        the recorder thread: the compute thread is then free at once for a lone client's next request, which
        can come before the record's round trip would be over."""
        handed = None
        try:
            handed = self._hand_out(enc)
        except CONNECTION_ERRORS as e:
            log.error("Redis unreachable; the results of %d job(s) could not be delivered (%s)",
                      len(enc.batch.jobs), e)
        except Exception:
            log.exception("delivering a batch failed")
        finally:
            self._release_reserved(enc.batch)  # of jobs not delivered by shm
        if handed is None:
            self._forget(enc.batch.settle())
        elif record_later and handed.all_rung:
            with self._held_lock:
                self._awaiting_record += len(handed.jobs)
            self._to_record.put(handed)
        else:
            self._record_logged(handed)

    def _forget(self, jobs: list[PreparedJob], deferred: bool = False) -> None:
        """Delivered (or given up on): their heartbeat is no longer ours."""
        with self._held_lock:
            for p in jobs:
                self._held.pop(p.taken.job_id, None)
            if deferred:
                self._awaiting_record -= len(jobs)

    def _hand_out(self, enc: Encoded) -> "HandedOut":
        """Writes the batch's results (segments; blob writes queued) and rings the clients on doorbells."""
        self.runner.finish(enc)
        jobs = enc.batch.settle()
        handed = HandedOut(enc, jobs, self.connection.pipeline(transaction=False))
        lost = len(enc.batch.jobs) - len(jobs)  # run ahead of claims another worker won: nothing to deliver
        if not jobs:
            handed.stats = self.stats.runs_lost(lost)
            return handed
        latencies, rung_results = [], 0
        for p in jobs:
            self.runner.launched.wait(LAUNCH_WAIT_S)
            t = p.taken
            if t.job_id in enc.errors:
                handed.failed.append((t, enc.errors[t.job_id]))
                continue
            queued = t.enqueued_at or t.taken_at
            timings = dict(queue_ms=ms(t.taken_at - queued), batch_ms=ms(enc.started_at - t.taken_at),
                           infer_ms=round(enc.infer_ms, 3),
                           deliver_ms=ms(time.time() - enc.started_at - enc.infer_ms / 1e3),
                           batch_jobs=len(jobs), handed_at=time.time())
            reserved, p.reserved = p.reserved, None
            handle = self.writer.write(t.job_id, t.request, enc.outputs[t.job_id], handed.blobs, timings, reserved)
            value = handle.to_msgpack()
            # A client waiting on a doorbell has its result now, before Redis does (broker.doorbell).
            rung = (handle.transport == "shm" and t.request.bell != ""
                    and self.ringer.ring(t.request.bell, t.job_id, value))
            if handle.transport == "shm" and not rung:
                handed.segments.append(handle.location)
            rung_results += bool(rung)
            handed.done.append((t, value))
            latencies.append((time.time() - queued) * 1e3)
        handed.stats = self.stats.batch(
            jobs=len(jobs), failed=len(handed.failed), prompts=sum(len(p.tokens.ids) for p in jobs),
            tokens=sum(p.n_tokens for p in jobs), computed_tokens=enc.computed_tokens, cache_hits=enc.cache_hits,
            cache_misses=enc.cache_misses, latencies_ms=latencies, infer_ms=enc.infer_ms,
            jobs_claimed_by_ring=sum(p.taken.rung for p in jobs), results_rung=rung_results,
            jobs_run_ahead=len(jobs) if enc.batch.claims_settled is not None else 0, runs_ahead_lost=lost,
            **({"vision_images_computed": enc.vision_computed, "vision_images_reused": enc.vision_reused}
               if enc.vision_computed or enc.vision_reused else {}))  # i2i: vision tower runs vs reuses
        return handed

    def _record_logged(self, handed: "HandedOut", deferred: bool = False) -> None:
        try:
            self._record(handed)
        except CONNECTION_ERRORS as e:
            log.error("Redis unreachable; the results of %d job(s) could not be recorded (%s)", len(handed.jobs), e)
        except Exception:
            log.exception("recording a batch failed")
        finally:
            self._forget(handed.jobs, deferred)

    def _record(self, handed: "HandedOut") -> None:
        """The batch's results and failures into Redis (registries, result streams), blob writes first."""
        enc = handed.enc
        try:
            if len(handed.blobs):
                handed.blobs.execute()  # before the handles that point at them
            self.source.record(handed.done, handed.failed, self.config.result_ttl_s, handed.stats)
        except CONNECTION_ERRORS:
            for name in handed.segments:  # nobody will be told where they are (rung ones are being read)
                unlink_segment(name)
            raise
        finally:
            handed.blobs.reset()
        for t, reason in handed.failed:
            log.warning("job %s failed: %s", t.job_id, reason)
        if handed.jobs:
            log.info("batch: %d job(s), %d token(s) (%d computed, %d cache hit(s)), %d failed; formed in %.1f ms, "
                     "%.1f ms on the encoder, %.1f ms to record", len(handed.jobs), enc.batch.tokens,
                     enc.computed_tokens, enc.cache_hits, len(handed.failed),
                     (enc.started_at - enc.batch.opened_at) * 1e3, enc.infer_ms,
                     (time.time() - enc.started_at) * 1e3 - enc.infer_ms)


@dataclass(slots=True)
class HandedOut:
    """A batch whose results are out (segments filled, blob writes queued, doorbells rung), to record in Redis."""

    enc: Encoded
    jobs: list[PreparedJob]  # the ones to record (a batch run ahead drops the jobs another worker took)
    blobs: object  # a Redis pipeline of the blob results' writes
    done: list = field(default_factory=list)  # (job, handle msgpack)
    failed: list = field(default_factory=list)  # (job, reason)
    segments: list = field(default_factory=list)  # shm results no client was rung about: unlinked if not recorded
    stats: object = None  # workers.job_source.StatsUpdate

    @property
    def all_rung(self) -> bool:
        """Every job's client has its result already, by doorbell."""
        return bool(self.done) and not self.failed and not self.segments and not len(self.blobs)
