"""The delivery stage of the encoder worker: waits for each computed batch's copies to the host and keeps its new
states in the encoding cache (Links.cache), writes its results (shared-memory segments, or blobs), rings the
clients on this host with their handles (broker.protocol.doorbell) and records the batch in Redis (blob writes
and the RECORD script in one round trip). A job run twice (its client enqueued it again after Redis lost it) is
recorded once: RECORD names the jobs an earlier run answered, and their results here are removed."""

from __future__ import annotations

import logging
import time

from broker.protocol.doorbell import Ringer
from broker.protocol.schemas import Handle
from shm import unlink_segment
from workers.job_source import CONNECTION_ERRORS, JobSource, StatsUpdate, TakenJob, skipped_ids
from workers.result_writer import ResultWriter
from workers.stages.links import LAUNCH_WAIT_S, Links
from workers.stages.types import Encoded
from workers.stats import batch_stats

log = logging.getLogger("workers")


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


class Delivery:
    def __init__(self, source: JobSource, writer: ResultWriter, result_ttl_s: int, links: Links):
        self.source = source
        self.writer = writer
        self.result_ttl_s = result_ttl_s
        self.links = links
        self.ringer = Ringer()

    def run(self) -> None:
        """The delivery thread: batches from `links.done` until None."""
        while (enc := self.links.done.get()) is not None:
            self.deliver(enc)

    def deliver(self, enc: Encoded) -> None:
        """Delivers a batch; failures are logged, never raised (its jobs stay started: recovery retries them)."""
        unrung: list[str] = []  # shm results no client was rung about: unlinked if the record fails
        handles: dict[str, Handle] = {}  # job id -> its result's handle
        try:
            self.landed(enc)
            with self.source.connection.pipeline(transaction=False) as pipe:
                done, failed, stats = self._write(enc, pipe, unrung, handles)
                on_pipe = len(pipe) > 0
                skipped = self.source.record(done, failed, self.result_ttl_s, stats, pipe=pipe if on_pipe else None)
                if on_pipe:
                    skipped = skipped_ids(pipe.execute()[-1])
        except Exception as e:
            if isinstance(e, CONNECTION_ERRORS):
                log.error("Redis unreachable; the results of %d job(s) were not recorded (%s)", len(enc.batch.jobs), e)
            else:
                log.exception("delivering a batch failed")
            for name in unrung:  # nobody will be told where they are (rung ones are being read)
                unlink_segment(name)
            return
        finally:  # recorded, or left to recovery once their heartbeat lapses (the jobs stay started)
            self.links.held.put(("release", [p.taken for p in enc.batch.jobs]))
        if skipped:
            self._drop_second_results(skipped, handles, unrung)
        for t, reason in failed:
            if t.job_id not in skipped:
                log.warning("job %s failed: %s", t.job_id, reason)
        log.info("batch: %d job(s), %d token(s) (%d computed, %d cache hit(s)), %d failed; formed in %.1f ms, "
                 "%.1f ms on the encoder, %.1f ms to deliver", len(enc.batch.jobs), enc.batch.tokens,
                 enc.computed_tokens, enc.cache_hits, len(failed), (enc.started_at - enc.batch.opened_at) * 1e3,
                 enc.infer_ms, (time.time() - enc.started_at) * 1e3 - enc.infer_ms)

    def landed(self, enc: Encoded) -> None:
        """Waits for the batch's copies to the host, then keeps its new states in the encoding cache."""
        for copied in enc.copies:
            copied.synchronize()  # torch lets go of the GIL while it waits: intake and compute run on
        cache = self.links.cache
        if cache.max_bytes:
            with self.links.cache_lock:  # compute reads it
                for key, r in enc.to_cache:
                    # a view would keep the whole batch's buffer alive in the cache: store a copy of its rows
                    cache.put(key, r.clone() if r.untyped_storage().nbytes() > r.nbytes else r)

    def _drop_second_results(self, skipped: list[str], handles: dict[str, Handle], unrung: list[str]) -> None:
        """Removes the results of jobs that an earlier run had answered: nobody will read them. A segment rung to
        its client is left to it (it reads it, or its doorbell unlinks it as a ring for a job it no longer
        waits for); a blob or an unrung segment is removed here."""
        blobs = []
        for job_id in skipped:
            handle = handles.get(job_id)
            if handle is None:
                continue  # failed here: nothing written
            if handle.transport == "blob":
                blobs.append(handle.location)
            elif handle.location in unrung:
                unlink_segment(handle.location)
        if blobs:
            try:
                self.source.connection.delete(*blobs)
            except CONNECTION_ERRORS as e:  # they expire with result_ttl_s
                log.error("Redis unreachable; %d dropped result blob(s) left to expire (%s)", len(blobs), e)
        if self.source.observe is not None:
            self.source.observe(StatsUpdate({"duplicate_results": len(skipped)}))
        log.info("%d job(s) already answered by an earlier run (their client enqueued them again): this run's "
                 "result dropped: %s", len(skipped), ", ".join(skipped))

    def _write(self, enc: Encoded, pipe, unrung: list[str], handles: dict) -> tuple[list, list, object]:
        """Each job's result written (blob writes queued on `pipe`) and rung to its client on this host:
        (done: (job, handle msgpack), failed: (job, reason), the batch's stats); `handles` gets each job's."""
        done: list[tuple[TakenJob, bytes]] = []
        failed: list[tuple[TakenJob, str]] = []
        latencies, rung = [], 0
        for p in enc.batch.jobs:
            self.links.launched.wait(LAUNCH_WAIT_S)
            t = p.taken
            if t.job_id in enc.errors:
                failed.append((t, enc.errors[t.job_id]))
                continue
            queued = t.enqueued_at or t.taken_at
            timings = dict(queue_ms=ms(t.taken_at - queued), batch_ms=ms(enc.started_at - t.taken_at),
                           infer_ms=round(enc.infer_ms, 3),
                           deliver_ms=ms(time.time() - enc.started_at - enc.infer_ms / 1e3),
                           batch_jobs=len(enc.batch.jobs), handed_at=time.time())
            handle = handles[t.job_id] = self.writer.write(t.job_id, t.request, enc.outputs[t.job_id], pipe,
                                                           timings, exec_id=t.exec_id)
            value = handle.to_msgpack()
            if handle.transport == "shm":
                # A client waiting on a doorbell has its result now, before Redis does (broker.protocol.doorbell).
                if t.request.bell and self.ringer.ring(t.request.bell, t.job_id, value):
                    rung += 1
                else:
                    unrung.append(handle.location)
            done.append((t, value))
            latencies.append((time.time() - queued) * 1e3)
        return done, failed, batch_stats(enc, failed=len(failed), latencies_ms=latencies, results_rung=rung)
