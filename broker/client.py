"""EncoderClient: enqueue encode jobs, wait for their handles, read the hidden states (sync and asyncio)."""

from __future__ import annotations

import itertools
import os
import threading
import time

import torch

from broker.config import ClientConfig, load_json, normalize_text_encoder_type
from broker.doorbell import Doorbell, Ringer, local_bells, worker_bells_key
from broker.errors import InvalidRequest
from broker.host import host_id
from broker.queues import DEFAULT_QUEUE, ENCODE_FUNCTION
from broker.results import discard_result, raise_for_error, read_blob, read_shm
from broker.rq_wire import CONNECTION_ERRORS, JobWire
from broker.schemas import EncodeRequest, Handle, per_prompt_images


class EncoderClient:
    """Sends prompts to the encoder workers behind `redis_url` and returns one [L_i, D] tensor per prompt.

    `timeout` bounds each call end to end (enqueue, queueing, encoding, reading); `retries` is how many times a
    job is re-run when the worker running it dies, and how many times a refused connection is retried.
    `max_queue_depth` refuses new jobs at once with `Overloaded` while the queue is that long; 0 takes the
    bound the queue's workers publish (their config's max_queue_depth).
    `copy=False` returns tensors that view the (already unlinked) shared memory instead of copies.
    `doorbell` (shm transport, sync `encode`): this process and the workers on its host tell each other of a
    job and of its result directly (broker.doorbell), not only through Redis: while the queue is about empty, a
    worker on this host starts on the job when rung, and hands the result straight back. Jobs and results still
    go through Redis and its registries. One thread at a time waits on the doorbell; others sharing the client
    wait on Redis alone (every thread rings workers).
    """

    WORKER_BELLS_REFRESH_S = 5.0  # how long the list of this host's workers' doorbells is reused
    # Workers are rung only while the queue is about empty: a ring saves time only for an idle worker, and a
    # claim takes its job out of queue order.
    RING_MAX_QUEUE = 2

    def __init__(self, redis_url: str = "redis://127.0.0.1:6390/0", queue: str = DEFAULT_QUEUE,
                 timeout: float = 30.0, retries: int = 3, transport: str = "shm", *,
                 max_queue_depth: int = 0, copy: bool = True, doorbell: bool = True):
        if transport not in ("shm", "blob"):
            raise ValueError(f"transport must be 'shm' or 'blob', not {transport!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.transport = transport
        self.copy = copy
        self.use_doorbell = doorbell and transport == "shm"
        self._bell: Doorbell | None = None
        self._bell_in_use = threading.Lock()  # held by the one thread waiting on the doorbell
        self._ringer: Ringer | None = None
        self._worker_bells: list[str] = []
        self._worker_bells_at = float("-inf")
        self._ring_turns = itertools.count()  # which of this host's workers a job is rung to first
        self.wire = JobWire(redis_url, queue, ENCODE_FUNCTION, timeout, retries, max_queue_depth)

    @classmethod
    def from_config(cls, path: str, **overrides) -> "EncoderClient":
        """From a seed-style JSON config (text_encoder_type + lightllm_config)."""
        cfg = load_json(path)
        kind = normalize_text_encoder_type(cfg.get("text_encoder_type", "service"))
        if kind != "service":
            raise ValueError(f"{path}: text_encoder_type is {kind!r}; EncoderClient serves 'service' configs")
        cc = ClientConfig.from_seed(cfg)
        if cc.redis_url.startswith(("http://", "https://")):
            raise ValueError(f"{path}: service_url {cc.redis_url} is a LightLLM-protocol HTTP server; EncoderClient "
                             "speaks to the broker's Redis (DiT workers speak HTTP to such a URL)")
        kw = dict(redis_url=cc.redis_url, queue=cc.queue, timeout=cc.timeout, retries=cc.retries,
                  transport=cc.transport)
        kw.update(overrides)
        return cls(**kw)

    def _doorbell(self) -> Doorbell | None:
        """This process's doorbell (its waits are serialized by _bell_in_use)."""
        if not self.use_doorbell:
            return None
        if self._bell is None or self._bell.pid != os.getpid():  # a forked child binds its own
            self._bell = Doorbell()
        return self._bell

    def _ring_workers(self, request: bytes):
        """What JobWire.submit calls to ring one of this host's workers with a job id and its `request` (it
        returns how many it reached: 0 or 1); None when there are none. Workers take turns, one a job: the one
        rung starts on the job if idle and hands it on through Redis if busy (workers.worker)."""
        if not self.use_doorbell or not self._worker_bells or \
                not 0 <= self.wire.last_queue_length <= self.RING_MAX_QUEUE:
            return None
        if self._ringer is None:
            self._ringer = Ringer()
        ringer, bells, first = self._ringer, self._worker_bells, next(self._ring_turns)

        def ring(job_id: str) -> int:
            return int(any(ringer.ring(bells[(first + i) % len(bells)], job_id, request=request)
                           for i in range(len(bells))))
        return ring

    def _refresh_worker_bells(self) -> None:
        """Re-reads which workers on this host take rings, every WORKER_BELLS_REFRESH_S (after a submit: the
        worker is busy with the job meanwhile)."""
        now = time.time()
        if not self.use_doorbell or now - self._worker_bells_at < self.WORKER_BELLS_REFRESH_S:
            return
        self._worker_bells_at = now
        try:
            advertised = self.wire.redis.hgetall(worker_bells_key(self.wire.queue))
        except CONNECTION_ERRORS:
            return  # the wait that follows reports Redis down
        self._worker_bells = local_bells(advertised, host_id(), now)

    def _payload(self, prompts, task: str, images, deadline: float, raw: bool,
                 bell: Doorbell | None = None) -> tuple[bytes, str]:
        if isinstance(prompts, str):
            raise InvalidRequest("prompts must be a list of strings; wrap a single prompt in a list")
        prompts = list(prompts) if isinstance(prompts, tuple) else prompts
        n = len(prompts) if isinstance(prompts, list) else 0
        req = EncodeRequest(prompts=prompts, task=task, images=per_prompt_images(images, n),
                            transport=self.transport, client_host=host_id(), deadline=deadline, raw=raw,
                            bell=bell.name if bell is not None else "").validate()
        return req.to_msgpack(), f"encode {len(req.prompts)} {task} prompt(s)"

    def encode(self, prompts: list[str], task: str = "t2i", images: list | None = None,
               raw: bool = False) -> list[torch.Tensor]:
        """One [L_i, D] tensor per prompt, as `load_encoder(...).encode` returns them. With `raw`, prompts are
        already-templated model inputs and every token's state comes back (LightLLM's convention).

        images (task "i2i"): one list of encoded images (PNG, JPEG, WebP or BMP bytes) per prompt, or one flat
        list of bytes for the same images in every prompt (a prompt and its negative: one job, the images'
        features computed once)."""
        handle, _via = self.handle_of(prompts, task, images, raw)
        if handle.transport == "shm":
            return read_shm(handle, copy=self.copy)
        return read_blob(self.wire.getdel(handle.location), handle)

    def handle_of(self, prompts: list[str], task: str = "t2i", images: list | None = None,
                  raw: bool = False) -> tuple[Handle, str]:
        """`encode` up to the result's handle, not yet read: (the handle, how it came: "redis" or "doorbell")."""
        deadline = self.wire.deadline()
        ringable = self.use_doorbell and self._bell_in_use.acquire(blocking=False)
        try:
            bell = self._doorbell() if ringable else None
            payload, description = self._payload(prompts, task, images, deadline, raw, bell)
            job_id = self.wire.submit(payload, deadline, description, ring=self._ring_workers(payload))
            self._refresh_worker_bells()
            outcome = self.wire.wait(job_id, deadline, bell, stale=discard_result)
        finally:
            if ringable:
                self._bell_in_use.release()
        return Handle.from_msgpack(raise_for_error(outcome)), outcome.via

    async def aencode(self, prompts: list[str], task: str = "t2i", images: list | None = None,
                      raw: bool = False) -> list[torch.Tensor]:
        """`encode` for asyncio: many calls may be in flight at once on one client."""
        deadline = self.wire.deadline()
        payload, description = self._payload(prompts, task, images, deadline, raw)
        job_id = await self.wire.asubmit(payload, deadline, description)
        handle = Handle.from_msgpack(raise_for_error(await self.wire.await_result(job_id, deadline)))
        if handle.transport == "shm":
            return read_shm(handle, copy=self.copy)
        return read_blob(await self.wire.agetdel(handle.location), handle)

    def close(self) -> None:
        self.wire.close()
        if self._bell is not None and self._bell.pid == os.getpid():
            self._bell.close()
        self._bell = None
        if self._ringer is not None:
            self._ringer.close()
            self._ringer = None

    async def aclose(self) -> None:
        await self.wire.aclose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
