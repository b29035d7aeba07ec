"""Writes one job's hidden states to a shared-memory segment (same host) or a Redis blob, and returns its handle."""

from __future__ import annotations

import collections
import logging
import time

import torch

from broker.protocol import keys
from broker.protocol.schemas import Blob, EncodeRequest, Handle
from shm import ShmError, ShmSpaceError, write_segment

log = logging.getLogger(__name__)

ALIGN = 64  # each prompt's states start on a cache line, so clients' views are aligned
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def layout(tensors: list[torch.Tensor]) -> tuple[list, list, int]:
    """(shapes, byte offsets, total bytes) of the prompts' states laid back to back, each start aligned."""
    shapes, offsets, pos = [list(t.shape) for t in tensors], [], 0
    for t in tensors:
        offsets.append(pos)
        pos += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return shapes, offsets, pos


class ResultWriter:
    def __init__(self, host_id: str, ttl_s: int, worker_name: str, shm_prefix: str = "eb",
                 shm_max_bytes: int | None = None):
        self.host_id = host_id
        self.ttl_s = ttl_s
        self.worker_name = worker_name
        self.shm_prefix = shm_prefix
        self.shm_max_bytes = shm_max_bytes
        self.results: collections.Counter = collections.Counter()  # handles written, by transport (workers.metrics)

    def goes_by_shm(self, request: EncodeRequest) -> bool:
        return request.transport == "shm" and request.client_host == self.host_id

    def write(self, job_id: str, request: EncodeRequest, tensors: list[torch.Tensor], pipeline,
              timings: dict, exec_id: str) -> Handle:
        """`tensors` are CPU and contiguous. Blob writes go on `pipeline`, executed by the caller; a blob's key
        names the job's execution `exec_id` too."""
        dtype = DTYPE_NAMES[tensors[0].dtype]
        shapes, offsets, total = layout(tensors)
        expires_at = time.time() + self.ttl_s
        common = dict(dtype=dtype, shapes=shapes, offsets=offsets, nbytes=total, expires_at=expires_at,
                      timings=timings, worker=self.worker_name)
        if self.goes_by_shm(request):
            parts = [(off, t.view(torch.uint8).numpy()) for t, off in zip(tensors, offsets) if t.numel()]
            try:
                name = write_segment(total, self.ttl_s, self.shm_prefix, parts, max_total_bytes=self.shm_max_bytes)
            except ShmSpaceError as e:
                log.warning("job %s: %s; sending it as a Redis blob instead", job_id, e)
            except ShmError as e:
                log.warning("job %s: shared memory failed (%s); sending it as a Redis blob instead", job_id, e)
            else:
                self.results["shm"] += 1
                return Handle(transport="shm", location=name, **common)
        data = bytearray(total)
        view = memoryview(data)
        for t, off in zip(tensors, offsets):
            n = t.numel() * t.element_size()
            view[off:off + n] = t.contiguous().view(torch.uint8).numpy().tobytes() if n else b""
        key = keys.blob(job_id, exec_id)
        blob = Blob(dtype=dtype, shapes=shapes, offsets=offsets, data=bytes(data))
        pipeline.set(key, blob.to_msgpack(), ex=self.ttl_s)
        self.results["blob"] += 1
        return Handle(transport="blob", location=key, **common)
