"""What the encoder worker's stages hand each other through their links (workers.stages.links): intake forms a
JobBatch of PreparedJobs, compute answers it with an Encoded, delivery writes and records that."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from workers.encoders.base import TokenizedPrompts
from workers.job_source import TakenJob


@dataclass(slots=True)
class PreparedJob:
    """A started job with its token ids, waiting for (or in) a batch."""

    taken: TakenJob
    tokens: TokenizedPrompts
    pixels: int = 0  # decoded image pixels it holds of the worker's budget (workers.pixel_budget) until computed

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.tokens.ids)


@dataclass(slots=True)
class JobBatch:
    """The jobs intake closed into one batch (Links.ready), in the order they came."""

    jobs: list[PreparedJob] = field(default_factory=list)
    tokens: int = 0
    opened_at: float = 0.0

    def add(self, job: PreparedJob) -> None:
        if not self.jobs:
            self.opened_at = time.time()
        self.jobs.append(job)
        self.tokens += job.n_tokens

    def waited_ms(self) -> float:
        return (time.time() - self.opened_at) * 1e3 if self.jobs else 0.0


@dataclass(slots=True)
class Encoded:
    """Compute's answer for a batch (Links.done): tensors (CPU) or an error per job, and what it cost."""

    batch: JobBatch
    outputs: dict
    errors: dict
    started_at: float
    infer_ms: float
    computed_tokens: int
    cache_hits: int
    cache_misses: int
    vision_computed: int = 0  # images run through the vision tower
    vision_reused: int = 0  # image occurrences served from the feature cache or a repeat in the batch
    copies: list = field(default_factory=list)  # CUDA events of device-to-host copies still in flight
    to_cache: list = field(default_factory=list)  # (cache key, state) to keep once copied
    expired: int = 0  # jobs not computed: their client's deadline had passed (failed with EXPIRED)
