"""The encoder worker's I/O loop: take a batch of jobs, run the encoder once for all of them, write results.

Three parts kept apart: `JobSource` (Redis), `batching` (pure policy), the encoder backend (a flat batch of
token sequences). This file only wires them together and keeps the worker alive through bad jobs, a failing
batch and Redis restarts.
"""

from __future__ import annotations

import logging
import time

import torch

from broker.errors import BrokerError
from broker.host import host_id
from shm import sweep
from workers.batching import split_by_tokens, unique_sequences
from workers.config import EncoderWorkerConfig
from workers.encoders.base import TokenizedBatch
from workers.job_source import TakenJob
from workers.result_writer import ResultWriter
from workers.serve_loop import HEARTBEAT_TTL_S, ServeLoop

log = logging.getLogger("workers")


class EncoderWorker(ServeLoop):
    def __init__(self, config: EncoderWorkerConfig, encoder):
        super().__init__(config.redis_url, config.queue, config.max_payload_bytes)
        self.config = config
        self.encoder = encoder
        self.maintenance_interval_s = config.sweep_interval_s
        self.writer = ResultWriter(host_id(), config.result_ttl_s, self.name, config.shm_prefix,
                                   config.shm_max_bytes)

    def describe(self) -> str:
        return f"queue {self.queue!r} with the {self.encoder.backend} encoder on {self.encoder.device}"

    def batch_size(self) -> int:
        return self.config.max_batch_requests

    def maintain(self) -> None:
        removed = sweep(self.config.shm_prefix, grace_s=min(self.config.result_ttl_s, 10))
        if removed:
            log.info("swept %d expired or orphaned segment(s)", len(removed))

    # -- one batch -------------------------------------------------------------------------------------
    def handle(self, jobs: list[TakenJob]) -> None:
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
        batch = self.encoder.tokenize(req.prompts, req.task, raw=req.raw)
        if req.max_tokens is not None:
            for i, n in enumerate(batch.output_lengths):
                if n > req.max_tokens:
                    raise PromptTooLong(f"prompt {i} is {n} tokens, over the job's max_tokens {req.max_tokens}")
        return batch

    def _encode(self, ready: list[TakenJob], batches: dict) -> tuple[dict, dict]:
        """Every ready job's tensors (CPU), computing identical sequences once; or the error per job."""
        outputs, errors = {}, {}
        groups: dict[tuple[str, int], list[TakenJob]] = {}  # raw inputs (drop_idx 0) run apart from templated
        for t in ready:
            b = batches[t.job_id]
            groups.setdefault((b.task, b.drop_idx), []).append(t)
        for (task, drop), group in groups.items():
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

