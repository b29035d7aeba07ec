"""Turning a worker's result handle back into tensors: attach the segment or unpack the blob, then unlink."""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass

import torch

from broker.errors import EncodeFailed, ProtocolError, ResultLost
from broker.schemas import Blob, Handle
from broker.serializer import MsgpackSerializer, inflate

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

MAX_ERROR_TEXT_BYTES = 1 << 20  # a failed job's traceback, as RQ stores it (zlib)
# rq.results.Result.Type values, as stored in the result stream's "type" field
RESULT_SUCCESSFUL, RESULT_FAILED, RESULT_STOPPED, RESULT_RETRIED, RESULT_MAX_RETRIES = 1, 2, 3, 4, 5


@dataclass(slots=True)
class JobOutcome:
    value: bytes | None  # the job's return value: msgpack of a Handle, GenerateResult, ...
    error: str | None
    via: str = "redis"  # how it came: "redis" (the job's result stream) or "doorbell" (broker.doorbell)


def parse_result_entry(fields: dict) -> JobOutcome:
    """One entry of RQ's result stream (rq:results:<job id>), decoded without RQ's sync-only helpers."""
    fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
    kind = int(fields.get("type", 0))
    if kind == RESULT_SUCCESSFUL:
        raw = fields.get("return_value")
        if raw is None:
            raise ProtocolError("a successful result carries no return value")
        value = MsgpackSerializer.loads(base64.b64decode(raw))
        if not isinstance(value, bytes):
            raise ProtocolError(f"a result's return value must be msgpack bytes, got {type(value).__name__}")
        return JobOutcome(value, None)
    exc = fields.get("exc_string")
    try:  # bounded: a result stream's entry is anyone's who reaches Redis
        text = inflate(base64.b64decode(exc), MAX_ERROR_TEXT_BYTES).decode(errors="replace") if exc else ""
    except (ValueError, zlib.error) as e:  # InflateLimitExceeded and bad base64 are ValueErrors
        text = f"its error text is unreadable ({e})"
    reason = {RESULT_STOPPED: "stopped", RESULT_MAX_RETRIES: "out of retries"}.get(kind, "failed")
    return JobOutcome(None, last_line(text) or f"job {reason}")


def result_fields(xread_reply: list) -> dict:
    """The fields of the one entry a raw `XREAD COUNT 1 STREAMS <key> ...` reply holds (RESP2: a list of
    [key, entries]; RESP3: a map of key to entries)."""
    (_key, entries), = xread_reply.items() if isinstance(xread_reply, dict) else xread_reply
    (_entry_id, flat), = entries[:1]
    return dict(zip(flat[::2], flat[1::2]))


def last_line(exc_string: str) -> str:
    """RQ stores a traceback; the user needs its last line (the exception and its message)."""
    lines = [ln for ln in exc_string.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def raise_for_error(outcome: JobOutcome) -> bytes:
    if outcome.error is not None:
        raise EncodeFailed(outcome.error)
    assert outcome.value is not None
    return outcome.value


def _split(buffer, handle_like, copy: bool) -> list[torch.Tensor]:
    dtype = TORCH_DTYPES[handle_like.dtype]
    out = []
    for shape, offset in zip(handle_like.shapes, handle_like.offsets):
        count = shape[0] * shape[1]
        if count == 0:
            out.append(torch.empty(shape, dtype=dtype))
            continue
        t = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).view(*shape)
        out.append(t.clone() if copy else t)
    return out


def read_shm(handle: Handle, copy: bool = True) -> list[torch.Tensor]:
    """Reads the segment and unlinks it. With copy=False the tensors view the (unlinked) mapping directly."""
    from shm import ShmNotFoundError, attach_segment, read_segment, unlink_segment

    try:
        if copy:
            # One read of the whole segment into memory of our own. (Tensor.clone of a mapping would fault its
            # pages in one by one, and run torch's intra-op thread pool, whose spinning threads, times many
            # client processes, starve the worker on the same host.)
            try:
                return _split(read_segment(handle.location), handle, copy=False)
            finally:
                unlink_segment(handle.location)
        seg = attach_segment(handle.location)
    except ShmNotFoundError:
        raise ResultLost(
            f"shared-memory segment {handle.location} is gone: it expired (at {handle.expires_at:.0f}) "
            "or was swept before this client read it"
        ) from None
    try:
        return [seg.torch(off, shape, TORCH_DTYPES[handle.dtype]) for shape, off in zip(handle.shapes, handle.offsets)]
    finally:
        seg.unlink()
        seg.close()


def discard_result(handle_bytes: bytes) -> None:
    """Unlinks the segment of a result nobody will read (a doorbell ring for a job its client no longer waits
    for); anything that is not a handle to one of our segments, or a segment already gone, is left alone."""
    from shm import SegmentName, ShmError, unlink_segment

    try:
        handle = Handle.from_msgpack(handle_bytes)
    except ProtocolError:
        return
    if handle.transport == "shm" and SegmentName.parse(handle.location) is not None:
        try:
            unlink_segment(handle.location)
        except ShmError:
            pass


def read_blob(raw: bytes | None, handle: Handle) -> list[torch.Tensor]:
    if raw is None:
        raise ResultLost(f"result blob {handle.location} is gone: it expired before this client read it")
    blob = Blob.from_msgpack(raw)
    return _split(bytearray(blob.data), blob, copy=False)  # the bytearray is ours alone: no copy needed
