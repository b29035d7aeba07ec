"""The encoder worker's I/O loop: take a batch of jobs, run the encoder once for all of them, write results.

Three parts kept apart: `JobSource` (Redis), `batching` (pure policy), the encoder backend (a flat batch of
token sequences). This file only wires them together and keeps the worker alive through bad jobs, a failing
batch and Redis restarts.
"""

from __future__ import annotations

import logging
import signal
import time

import redis
import torch
from rq import Queue, SimpleWorker

from broker.errors import BrokerError
from broker.host import host_id
from broker.serializer import MsgpackSerializer
from shm import sweep
from workers.batching import split_by_tokens, unique_sequences
from workers.config import EncoderWorkerConfig
from workers.encoders.base import TokenizedBatch
from workers.job_source import JobSource, TakenJob
from workers.result_writer import ResultWriter

log = logging.getLogger("workers")

HEARTBEAT_TTL_S = 30  # a worker silent for this long is presumed dead; its jobs are retried or failed


class EncoderWorker:
    def __init__(self, config: EncoderWorkerConfig, encoder):
        self.config = config
        self.encoder = encoder
        self.connection = redis.Redis.from_url(config.redis_url, socket_connect_timeout=5, socket_timeout=30,
                                               health_check_interval=30)
        queue = Queue(config.queue, connection=self.connection, serializer=MsgpackSerializer)
        # RQ's worker record only: registration, heartbeat and state, so rq-dashboard and `rq info` see us.
        self.rq_worker = SimpleWorker([queue], connection=self.connection, serializer=MsgpackSerializer)
        self.name = self.rq_worker.name
        self.source = JobSource(self.connection, config.queue, self.name, config.max_payload_bytes)
        self.writer = ResultWriter(host_id(), config.result_ttl_s, self.name, config.shm_prefix,
                                   config.shm_max_bytes)
        self._stop = False
        self._last_maintenance = 0.0

    # -- lifecycle -------------------------------------------------------------------------------------
    def request_stop(self, *_):
        self._stop = True

    def run(self, max_batches: int | None = None) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self._register()
        log.info("worker %s serving queue %r with the %s encoder on %s", self.name, self.config.queue,
                 self.encoder.backend, self.encoder.device)
        batches, backoff = 0, 0.5
        while not self._stop and (max_batches is None or batches < max_batches):
            try:
                self._maintain()
                first = self.source.wait_first(1.0)
                if first is None:
                    continue
                jobs = self.source.take(first, self.config.max_batch_requests - 1)
                self.process(jobs)
                batches += 1
                backoff = 0.5
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.error("Redis unreachable (%s); retrying in %.1fs", e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                self._registered = False
        try:
            self.rq_worker.register_death()
        except redis.RedisError:
            pass
        log.info("worker %s stopped", self.name)

    def _register(self) -> None:
        self.rq_worker.register_birth()
        self.rq_worker.set_state("idle")
        self._registered = True

    def _maintain(self) -> None:
        """Heartbeat, abandoned-job cleanup and the segment sweep, at most every sweep_interval_s."""
        t = time.time()
        if t - self._last_maintenance < self.config.sweep_interval_s:
            return
        if not getattr(self, "_registered", False):
            self._register()  # Redis came back, maybe empty: announce ourselves again
        self.rq_worker.heartbeat(HEARTBEAT_TTL_S + 60)
        self.source.requeue_abandoned()
        removed = sweep(self.config.shm_prefix, grace_s=min(self.config.result_ttl_s, 10))
        if removed:
            log.info("swept %d expired or orphaned segment(s)", len(removed))
        self._last_maintenance = t

    # -- one batch -------------------------------------------------------------------------------------
    def process(self, jobs: list[TakenJob]) -> None:
        t0 = time.time()
        failed: list[tuple[TakenJob, str]] = [(t, t.error) for t in jobs if t.error is not None]
        ready, batches = [], {}
        for t in jobs:
            if t.error is not None:
                continue
            try:
                batches[t.job_id] = self._tokenize(t)
                ready.append(t)
            except BrokerError as e:
                failed.append((t, f"{type(e).__name__}: {e}"))
        if ready:
            self.source.mark_started(ready, HEARTBEAT_TTL_S)
        t_tok = time.time()
        outputs, errors = self._encode(ready, batches)
        t_inf = time.time()
        done = []
        with self.connection.pipeline(transaction=False) as pipe:
            for t in ready:
                if t.job_id in errors:
                    failed.append((t, errors[t.job_id]))
                    continue
                timings = dict(queue_ms=round((t0 - t.job.enqueued_at.timestamp()) * 1e3, 3)
                               if t.job.enqueued_at else None,
                               tokenize_ms=round((t_tok - t0) * 1e3, 3), infer_ms=round((t_inf - t_tok) * 1e3, 3),
                               batch_jobs=len(ready))
                handle = self.writer.write(t.job_id, t.request, outputs[t.job_id], pipe, timings)
                done.append((t, handle.to_msgpack()))
            self.source.record(done, failed, self.config.result_ttl_s, pipeline=pipe)
        for t, reason in failed:
            log.warning("job %s failed: %s", t.job_id, reason)
        if ready:
            n_prompts = sum(len(b.ids) for b in batches.values())
            log.info("batch: %d job(s), %d prompt(s), %d failed, %.1f ms", len(ready), n_prompts, len(failed),
                     (time.time() - t0) * 1e3)

    def _tokenize(self, t: TakenJob) -> TokenizedBatch:
        from broker.errors import InvalidRequest, PromptTooLong

        req = t.request
        if len(req.prompts) > self.config.max_prompts_per_job:
            raise InvalidRequest(f"{len(req.prompts)} prompts in one job, over max_prompts_per_job "
                                 f"{self.config.max_prompts_per_job}")
        batch = self.encoder.tokenize(req.prompts, req.task)
        if req.max_tokens is not None:
            for i, n in enumerate(batch.output_lengths):
                if n > req.max_tokens:
                    raise PromptTooLong(f"prompt {i} is {n} tokens, over the job's max_tokens {req.max_tokens}")
        return batch

    def _encode(self, ready: list[TakenJob], batches: dict) -> tuple[dict, dict]:
        """Every ready job's tensors (CPU), computing identical sequences once; or the error per job."""
        outputs, errors = {}, {}
        by_task: dict[str, list[TakenJob]] = {}
        for t in ready:
            by_task.setdefault(batches[t.job_id].task, []).append(t)
        for task, group in by_task.items():
            drop = batches[group[0].job_id].drop_idx
            seqs = [tuple(ids) for t in group for ids in batches[t.job_id].ids]
            uniq, index = unique_sequences(seqs)
            states: list[torch.Tensor | None] = [None] * len(uniq)
            chunk_error: dict[int, str] = {}
            for chunk in split_by_tokens([len(s) for s in uniq], self.config.max_batch_tokens):
                try:
                    res = self.encoder.encode_tokens(TokenizedBatch(task, [list(uniq[i]) for i in chunk], drop))
                    res = [r.to("cpu", non_blocking=False).contiguous() for r in res]
                    for i, r in zip(chunk, res):
                        states[i] = r
                except Exception as e:  # a failing batch fails its jobs, never the worker
                    log.exception("encoder failed on a batch of %d sequence(s)", len(chunk))
                    for i in chunk:
                        chunk_error[i] = f"encoder failed: {type(e).__name__}: {e}"
            pos = 0
            for t in group:
                n = len(batches[t.job_id].ids)
                idx = index[pos:pos + n]
                pos += n
                bad = [chunk_error[i] for i in idx if i in chunk_error]
                if bad:
                    errors[t.job_id] = bad[0]
                else:
                    outputs[t.job_id] = [states[i] for i in idx]
        return outputs, errors

