"""GenerationClient: enqueue generation jobs for the DiT workers, follow their progress, get their images."""

from __future__ import annotations

import time

from broker.errors import BrokerTimeout, BrokerUnavailable
from broker.protocol import keys
from broker.protocol.config import DEFAULT_REDIS_URL
from broker.protocol.queues import DEFAULT_GENERATE_QUEUE, GENERATE_FUNCTION
from broker.protocol.schemas import GenerateRequest, GenerateResult
from broker.protocol.serializer import MsgpackSerializer
from broker.redis_errors import BrokerErrors
from broker.results import raise_for_error
from broker.rq_wire import JobWire


class GenerationClient:
    """Sends generation jobs to the DiT workers behind `redis_url`. `timeout` bounds each job end to end
    (queueing, encoding, denoising, decoding); set it for your slowest size and step count. Every failure is a
    BrokerError (broker.errors), Redis's own errors too."""

    def __init__(self, redis_url: str = DEFAULT_REDIS_URL, queue: str = DEFAULT_GENERATE_QUEUE,
                 timeout: float = 600.0, retries: int = 0):
        self.wire = JobWire(redis_url, queue, GENERATE_FUNCTION, timeout, retries)
        self._redis_errors = BrokerErrors(redis_url)

    def submit(self, prompt: str, **kw) -> tuple[str, float]:
        """Enqueues one generation; returns (job id, deadline) for `wait`. Keywords: GenerateRequest's fields
        (negative_prompt, task, images, width, height, steps, seed, true_cfg_scale, output_dir, return_path).
        Raises InvalidRequest at once for what can be checked here (e.g. steps=0, i2i without images)."""
        deadline = self.wire.deadline()
        req = GenerateRequest(prompt=prompt, deadline=deadline, **kw).validate()
        with self._redis_errors:
            return self.wire.submit(req.to_msgpack(), deadline, f"generate: {prompt[:40]}"), deadline

    def wait(self, job_id: str, deadline: float, on_progress=None, poll_s: float = 0.25) -> GenerateResult:
        """The job's result. With `on_progress`, it is called with each new `progress(job_id)` value while waiting
        (every `poll_s` at most)."""
        with self._redis_errors:
            return self._wait(job_id, deadline, on_progress, poll_s)

    def _wait(self, job_id: str, deadline: float, on_progress, poll_s: float) -> GenerateResult:
        if on_progress is None:
            return GenerateResult.from_msgpack(raise_for_error(self.wire.wait(job_id, deadline)))
        last = None
        while True:
            try:
                outcome = self.wire.wait(job_id, min(deadline, time.time() + poll_s))
            except (BrokerTimeout, BrokerUnavailable) as e:
                # A Redis restart outlasts a poll: the wait goes on (as without on_progress) until the deadline.
                if time.time() >= deadline or (isinstance(e, BrokerUnavailable) and self.wire.retries <= 0):
                    raise
                try:
                    p = self.progress(job_id)
                except BrokerUnavailable:
                    continue
                if p and p != last:
                    on_progress(p)
                    last = p
                continue
            return GenerateResult.from_msgpack(raise_for_error(outcome))

    def generate(self, prompt: str, on_progress=None, **kw) -> GenerateResult:
        return self.wait(*self.submit(prompt, **kw), on_progress=on_progress)

    def progress(self, job_id: str) -> dict:
        """The job's progress as the DiT worker reports it: {"step": denoising steps done, "steps": of how many};
        {"step": 0, ...} once its embeddings are in; {} before it starts (or once the job record expired)."""
        with self._redis_errors:
            raw = self.wire.redis.hget(keys.job(job_id), "meta")
        if not raw:
            return {}
        meta = MsgpackSerializer.loads(raw)
        return meta.get("progress", {}) if isinstance(meta, dict) else {}

    def close(self) -> None:
        self.wire.close()
