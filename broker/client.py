"""EncoderClient: enqueue encode jobs, wait for their handles, read the hidden states (sync and asyncio)."""

from __future__ import annotations

import os
import threading

import torch

from broker.errors import InvalidRequest
from broker.protocol.config import DEFAULT_REDIS_URL, ClientConfig, load_json, normalize_text_encoder_type
from broker.protocol.doorbell import Doorbell
from broker.protocol.host import host_id
from broker.protocol.queues import DEFAULT_QUEUE, ENCODE_FUNCTION
from broker.protocol.schemas import EncodeRequest, Handle, per_prompt_images
from broker.redis_errors import BrokerErrors
from broker.results import (check_location, discard_result, raise_for_error, read_blob, read_shm, resolve_shm_prefix,
                            trusted_owners)
from broker.rq_wire import JobWire, QueueState


class EncoderClient:
    """Sends prompts to the encoder workers behind `redis_url` and returns one [L_i, D] tensor per prompt.

    `timeout` bounds each call end to end (enqueue, queueing, encoding, reading); `retries` is how many times a
    job is re-run when the worker running it dies; a refused connection is retried until the timeout (never with
    retries=0), so a call rides out a Redis restart, even one that lost its job (enqueued again: broker.rq_wire).
    `max_queue_depth` refuses new jobs at once with `Overloaded` while the queue is that long; 0 takes the
    bound the queue's workers publish (their config's max_queue_depth).
    `copy=False` returns tensors that view the (already unlinked) shared memory instead of copies.
    `trusted_uids`: besides this process's own uid (and $EB_TRUSTED_UIDS), the users whose result segments are
    read (e.g. the workers' user, for a client running as root); a segment of any other owner is ResultLost.
    `shm_prefix`: the workers' shm_prefix (None: $EB_SHM_PREFIX, else "eb"); a result segment named under any
    other prefix, or a blob key that is not the job's own, is ResultLost, and nothing is opened or deleted.
    Every failure is a BrokerError (broker.errors): Redis's own errors too (BrokerUnavailable, RedisRefused).
    `doorbell` (shm transport, sync `encode`): a worker on this host hands the result's handle straight back to
    this process (broker.protocol.doorbell), besides recording it in Redis. One thread at a time waits on the doorbell;
    others sharing the client wait on Redis alone. `aencode` works in any event loop (one connection pool each,
    closed as its loop ends: broker.loop_clients).
    """

    def __init__(self, redis_url: str = DEFAULT_REDIS_URL, queue: str = DEFAULT_QUEUE,
                 timeout: float = 30.0, retries: int = 3, transport: str = "shm", *,
                 max_queue_depth: int = 0, copy: bool = True, doorbell: bool = True, trusted_uids=(),
                 shm_prefix: str | None = None):
        if transport not in ("shm", "blob"):
            raise ValueError(f"transport must be 'shm' or 'blob', not {transport!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.transport = transport
        self.copy = copy
        self.trusted = trusted_owners(trusted_uids)
        self.shm_prefix = resolve_shm_prefix(shm_prefix)
        self.use_doorbell = doorbell and transport == "shm"
        self._bell: Doorbell | None = None
        self._bell_in_use = threading.Lock()  # held by the one thread waiting on the doorbell
        self.wire = JobWire(redis_url, queue, ENCODE_FUNCTION, timeout, retries, max_queue_depth)
        self._redis_errors = BrokerErrors(redis_url)

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
                  transport=cc.transport, shm_prefix=cc.shm_prefix)
        kw.update(overrides)
        return cls(**kw)

    def _doorbell(self) -> Doorbell | None:
        """This process's doorbell (its waits are serialized by _bell_in_use)."""
        if not self.use_doorbell:
            return None
        if self._bell is None or self._bell.pid != os.getpid():  # a forked child binds its own
            self._bell = Doorbell()
        return self._bell

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
            return read_shm(handle, copy=self.copy, trusted=self.trusted, prefix=self.shm_prefix)
        with self._redis_errors:
            return read_blob(self.wire.getdel(handle.location), handle)

    def handle_of(self, prompts: list[str], task: str = "t2i", images: list | None = None,
                  raw: bool = False) -> tuple[Handle, str]:
        """`encode` up to the result's handle, not yet read: (the handle, how it came: "redis" or "doorbell"). The
        handle points at a segment named under shm_prefix or at the job's own blob key (else ResultLost)."""
        deadline = self.wire.deadline()
        ringable = self.use_doorbell and self._bell_in_use.acquire(blocking=False)
        try:
            bell = self._doorbell() if ringable else None
            payload, description = self._payload(prompts, task, images, deadline, raw, bell)
            with self._redis_errors:
                job_id = self.wire.submit(payload, deadline, description)
                outcome = self.wire.wait(job_id, deadline, bell, stale=self._discard)
        finally:
            if ringable:
                self._bell_in_use.release()
        return check_location(Handle.from_msgpack(raise_for_error(outcome)), job_id, self.shm_prefix), outcome.via

    def _discard(self, handle: bytes) -> None:
        """Unlinks the segment of a ring for a job this client no longer waits for (under shm_prefix only)."""
        discard_result(handle, self.shm_prefix)

    async def aencode(self, prompts: list[str], task: str = "t2i", images: list | None = None,
                      raw: bool = False) -> list[torch.Tensor]:
        """`encode` for asyncio: many calls may be in flight at once on one client."""
        deadline = self.wire.deadline()
        payload, description = self._payload(prompts, task, images, deadline, raw)
        with self._redis_errors:
            job_id = await self.wire.asubmit(payload, deadline, description)
            outcome = await self.wire.await_result(job_id, deadline)
        handle = check_location(Handle.from_msgpack(raise_for_error(outcome)), job_id, self.shm_prefix)
        if handle.transport == "shm":
            return read_shm(handle, copy=self.copy, trusted=self.trusted, prefix=self.shm_prefix)
        with self._redis_errors:
            return read_blob(await self.wire.agetdel(handle.location), handle)

    async def aqueue_depth(self) -> int:
        """How many jobs wait in the queue now."""
        with self._redis_errors:
            return await self.wire.aqueue_depth()

    async def aqueue_state(self, worker_stale_s: float) -> QueueState:
        """Whether the queue is served: its depth, the workers serving it whose heartbeat is younger than
        `worker_stale_s`, and which Redis answered (broker.rq_wire.QueueState)."""
        with self._redis_errors:
            return await self.wire.aqueue_state(worker_stale_s)

    def close(self) -> None:
        self.wire.close()
        if self._bell is not None and self._bell.pid == os.getpid():
            for handle in self._bell.take("")[1]:  # rings nobody waits for (a job run twice rings twice)
                discard_result(handle, self.shm_prefix)
            self._bell.close()
        self._bell = None

    async def aclose(self) -> None:
        await self.wire.aclose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
