"""The DiT worker: takes generation jobs, gets the prompt's and the negative prompt's embeddings in one call,
and (for now) reports what it got: their shapes and a checksum."""

from __future__ import annotations

import logging
import time

import torch

from broker.errors import BrokerError
from broker.queues import GENERATE_FUNCTION
from broker.schemas import GenerateRequest, GenerateResult
from dit_workers.config import DitWorkerConfig
from dit_workers.embeddings import make_embedder
from workers.job_source import TakenJob
from workers.serve_loop import HEARTBEAT_TTL_S, ServeLoop

log = logging.getLogger("dit_workers")


def checksum(tensors: list[torch.Tensor]) -> float:
    return float(sum(t.double().abs().sum().item() for t in tensors))


class DitWorker(ServeLoop):
    def __init__(self, cfg: DitWorkerConfig, device: str):
        super().__init__(cfg.redis_url, cfg.queue, cfg.max_payload_bytes, function=GENERATE_FUNCTION,
                         parse_request=GenerateRequest.from_msgpack)
        self.cfg = cfg
        self.embedder = make_embedder(cfg, device)

    def describe(self) -> str:
        return f"queue {self.queue!r}, text encoder mode {self.embedder.mode!r}"

    def handle(self, jobs: list[TakenJob]) -> None:
        ready = [t for t in jobs if t.error is None]
        failed = [(t, t.error) for t in jobs if t.error is not None]
        if ready:
            self.source.mark_started(ready, HEARTBEAT_TTL_S)
        done = []
        for t in ready:
            try:
                done.append((t, self.generate(t.request).to_msgpack()))
            except BrokerError as e:
                failed.append((t, f"{type(e).__name__}: {e}"))
            except Exception as e:  # one bad job must not stop the worker
                log.exception("job %s failed", t.job_id)
                failed.append((t, f"{type(e).__name__}: {e}"))
        self.source.record(done, failed, result_ttl=300)
        for t, reason in failed:
            log.warning("job %s failed: %s", t.job_id, reason)

    def generate(self, req: GenerateRequest) -> GenerateResult:
        t0 = time.time()
        embeds = self.embedder.embed([req.prompt, req.negative_prompt], req.task, req.images)
        t1 = time.time()
        log.info("job: prompt %s, negative %s, checksum %.4f", tuple(embeds[0].shape), tuple(embeds[1].shape),
                 checksum(embeds))
        return GenerateResult(embeds_shapes=[list(e.shape) for e in embeds], embeds_checksum=checksum(embeds),
                              encoder_mode=self.embedder.mode, timings={"encode_ms": round((t1 - t0) * 1e3, 3)})
