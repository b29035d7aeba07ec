"""GenerationClient: enqueue generation jobs for the DiT workers and wait for their images."""

from __future__ import annotations

from broker.queues import DEFAULT_GENERATE_QUEUE, GENERATE_FUNCTION
from broker.results import raise_for_error
from broker.rq_wire import JobWire
from broker.schemas import GenerateRequest, GenerateResult


class GenerationClient:
    def __init__(self, redis_url: str = "redis://127.0.0.1:6390/0", queue: str = DEFAULT_GENERATE_QUEUE,
                 timeout: float = 600.0, retries: int = 0):
        self.wire = JobWire(redis_url, queue, GENERATE_FUNCTION, timeout, retries)

    def submit(self, prompt: str, **kw) -> tuple[str, float]:
        """Enqueues one generation; returns (job id, deadline) for `wait`. Keywords: GenerateRequest's fields."""
        deadline = self.wire.deadline()
        req = GenerateRequest(prompt=prompt, deadline=deadline, **kw).validate()
        return self.wire.submit(req.to_msgpack(), deadline, f"generate: {prompt[:40]}"), deadline

    def wait(self, job_id: str, deadline: float) -> GenerateResult:
        return GenerateResult.from_msgpack(raise_for_error(self.wire.wait(job_id, deadline)))

    def generate(self, prompt: str, **kw) -> GenerateResult:
        return self.wait(*self.submit(prompt, **kw))

    def progress(self, job_id: str) -> dict:
        """The job's progress as the DiT worker reports it (step, steps), for a client's progress bar."""
        raw = self.wire.redis.hget(f"rq:job:{job_id}", "meta")
        if not raw:
            return {}
        from broker.serializer import MsgpackSerializer

        meta = MsgpackSerializer.loads(raw)
        return meta.get("progress", {}) if isinstance(meta, dict) else {}

    def close(self) -> None:
        self.wire.close()
