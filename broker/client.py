"""EncoderClient: enqueue encode jobs, wait for their handles, read the hidden states (sync and asyncio)."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aredis
import torch

from broker.config import ClientConfig, load_json, normalize_text_encoder_type
from broker.enqueue import ENQUEUE_SCRIPT, enqueue_args, new_job_mapping
from broker.errors import BrokerTimeout, BrokerUnavailable, InvalidRequest, Overloaded
from broker.host import host_id
from broker.queues import DEFAULT_QUEUE
from broker.results import parse_result_entry, raise_for_error, read_blob, read_shm
from broker.schemas import EncodeRequest, Handle

RESULT_KEY = "rq:results:{}"
RESULT_TTL_S = 60  # how long a handle waits in Redis for a client that is slow to read it


class EncoderClient:
    """Sends prompts to the encoder workers behind `redis_url` and returns one [L_i, D] tensor per prompt.

    `timeout` bounds each call end to end (enqueue, queueing, encoding, reading); `retries` is how many times a
    job is re-run when the worker running it dies, and how many times a refused connection is retried.
    `max_queue_depth` (0: unbounded) refuses new jobs at once with `Overloaded` while the queue is that long.
    """

    def __init__(self, redis_url: str = "redis://127.0.0.1:6390/0", queue: str = DEFAULT_QUEUE,
                 timeout: float = 30.0, retries: int = 3, transport: str = "shm", *,
                 max_queue_depth: int = 0, copy: bool = True):
        if transport not in ("shm", "blob"):
            raise ValueError(f"transport must be 'shm' or 'blob', not {transport!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.redis_url = redis_url
        self.queue = queue
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.transport = transport
        self.max_queue_depth = int(max_queue_depth)
        self.copy = copy
        # Reads block up to the whole timeout (XREAD BLOCK), so the socket may wait a little longer than that.
        conn_kw = dict(socket_connect_timeout=min(self.timeout, 5.0), socket_timeout=self.timeout + 1.0,
                       health_check_interval=0)
        self._redis = redis.Redis.from_url(redis_url, **conn_kw)
        self._aredis: aredis.Redis | None = None
        self._aredis_kw = conn_kw
        self._enqueue = self._redis.register_script(ENQUEUE_SCRIPT)

    @classmethod
    def from_config(cls, path: str, **overrides) -> "EncoderClient":
        """From a seed-style JSON config (text_encoder_type + lightllm_config)."""
        cfg = load_json(path)
        kind = normalize_text_encoder_type(cfg.get("text_encoder_type", "service"))
        if kind != "service":
            raise ValueError(f"{path}: text_encoder_type is {kind!r}; EncoderClient serves 'service' configs")
        cc = ClientConfig.from_seed(cfg)
        kw = dict(redis_url=cc.redis_url, queue=cc.queue, timeout=cc.timeout, retries=cc.retries,
                  transport=cc.transport)
        kw.update(overrides)
        return cls(**kw)

    # -- request building ------------------------------------------------------------------------------
    def _request(self, prompts, task: str, images, deadline: float) -> EncodeRequest:
        if isinstance(prompts, str):
            raise InvalidRequest("prompts must be a list of strings; wrap a single prompt in a list")
        images = [] if images is None else images
        req = EncodeRequest(prompts=list(prompts) if isinstance(prompts, tuple) else prompts, task=task,
                            images=images, transport=self.transport, client_host=host_id(), deadline=deadline)
        return req.validate()

    def _job(self, req: EncodeRequest) -> tuple[str, list, list]:
        remaining = max(1, int(req.deadline - time.time()) + 1)
        job_id, mapping = new_job_mapping(
            req.to_msgpack(), self.queue, job_timeout=remaining + 5, result_ttl=RESULT_TTL_S,
            failure_ttl=RESULT_TTL_S, ttl=remaining, retries=self.retries,
            description=f"encode {len(req.prompts)} {req.task} prompt(s)",
        )
        keys, argv = enqueue_args(job_id, mapping, self.queue, self.max_queue_depth, remaining)
        return job_id, keys, argv

    def _check_admitted(self, pushed: int) -> None:
        if pushed < 0:
            raise Overloaded(
                f"queue {self.queue!r} holds {self.max_queue_depth} jobs or more (max_queue_depth); "
                "retry later or add encoder workers"
            )

    def _unavailable(self, err: Exception) -> BrokerUnavailable:
        return BrokerUnavailable(f"cannot reach Redis at {self.redis_url}: {err}")

    # -- sync ------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str], task: str = "t2i", images: list[bytes] | None = None) -> list[torch.Tensor]:
        """One [L_i, D] tensor per prompt, as `load_encoder(...).encode` returns them."""
        deadline = time.time() + self.timeout
        job_id, keys, argv = self._job(self._request(prompts, task, images, deadline))
        self._check_admitted(self._retry_connect(lambda: self._enqueue(keys=keys, args=argv), deadline))
        handle = self._wait(job_id, deadline)
        return self._read(handle)

    def _retry_connect(self, call, deadline: float):
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if attempt == self.retries or time.time() + delay >= deadline:
                    raise self._unavailable(e) from None
                time.sleep(delay)
                delay *= 2

    def _wait(self, job_id: str, deadline: float) -> Handle:
        key = RESULT_KEY.format(job_id)
        while True:
            block_ms = int((deadline - time.time()) * 1000)
            if block_ms <= 0:
                raise BrokerTimeout(f"no result for job {job_id} within {self.timeout:.1f}s")
            try:
                got = self._redis.xread({key: "0-0"}, count=1, block=block_ms)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                raise self._unavailable(e) from None
            if got:
                _, entries = got[0]
                return raise_for_error(parse_result_entry(entries[0][1]))

    def _read(self, handle: Handle) -> list[torch.Tensor]:
        if handle.transport == "shm":
            return read_shm(handle, copy=self.copy)
        try:
            raw = self._redis.getdel(handle.location)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise self._unavailable(e) from None
        return read_blob(raw, handle)

    # -- asyncio ---------------------------------------------------------------------------------------
    def _async_redis(self) -> aredis.Redis:
        if self._aredis is None:
            self._aredis = aredis.Redis.from_url(self.redis_url, **self._aredis_kw)
        return self._aredis

    async def aencode(self, prompts: list[str], task: str = "t2i",
                      images: list[bytes] | None = None) -> list[torch.Tensor]:
        """`encode` for asyncio: many calls may be in flight at once on one client."""
        deadline = time.time() + self.timeout
        job_id, keys, argv = self._job(self._request(prompts, task, images, deadline))
        r = self._async_redis()
        pushed = await self._aretry_connect(lambda: r.eval(ENQUEUE_SCRIPT, len(keys), *keys, *argv), deadline)
        self._check_admitted(pushed)
        key = RESULT_KEY.format(job_id)
        while True:
            block_ms = int((deadline - time.time()) * 1000)
            if block_ms <= 0:
                raise BrokerTimeout(f"no result for job {job_id} within {self.timeout:.1f}s")
            try:
                got = await r.xread({key: "0-0"}, count=1, block=block_ms)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                raise self._unavailable(e) from None
            if got:
                _, entries = got[0]
                handle = raise_for_error(parse_result_entry(entries[0][1]))
                break
        if handle.transport == "shm":
            return read_shm(handle, copy=self.copy)
        try:
            raw = await r.getdel(handle.location)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise self._unavailable(e) from None
        return read_blob(raw, handle)

    async def _aretry_connect(self, call, deadline: float):
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if attempt == self.retries or time.time() + delay >= deadline:
                    raise self._unavailable(e) from None
                await asyncio.sleep(delay)
                delay *= 2

    def close(self) -> None:
        self._redis.close()

    async def aclose(self) -> None:
        if self._aredis is not None:
            await self._aredis.aclose()
            self._aredis = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
