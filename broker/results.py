"""Turning a worker's result handle back into tensors: attach the segment or unpack the blob, then unlink."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

import torch

from broker.errors import EncodeFailed, ProtocolError, ResultLost
from broker.protocol import keys
from broker.protocol.schemas import Blob, Handle
from broker.protocol.serializer import InflateLimitExceeded, MsgpackSerializer, inflate
from shm.names import DEFAULT_PREFIX, SegmentName, check_prefix

TRUSTED_UIDS_ENV = "EB_TRUSTED_UIDS"
SHM_PREFIX_ENV = "EB_SHM_PREFIX"  # the workers' shm_prefix, as their configs read it
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

MAX_ERROR_TEXT_BYTES = 1 << 20  # a failed job's traceback, as RQ stores it (zlib)
# rq.results.Result.Type values, as stored in the result stream's "type" field
RESULT_SUCCESSFUL, RESULT_FAILED, RESULT_STOPPED, RESULT_RETRIED, RESULT_MAX_RETRIES = 1, 2, 3, 4, 5


@dataclass(slots=True)
class JobOutcome:
    value: bytes | None  # the job's return value: msgpack of a Handle, GenerateResult, ...
    error: str | None
    via: str = "redis"  # how it came: "redis" (the job's result stream) or "doorbell" (broker.protocol.doorbell)


def parse_result_entry(fields: dict) -> JobOutcome:
    """One entry of RQ's result stream (rq:results:<job id>), decoded without RQ's sync-only helpers; an entry
    that is not one is a ProtocolError."""
    try:
        return _parse_result_entry(fields)
    except ProtocolError:
        raise
    except Exception as e:  # anything may sit in Redis: int(), b64 and zlib raise several types
        raise ProtocolError(f"a result entry is malformed: {type(e).__name__}: {e}") from None


def _parse_result_entry(fields: dict) -> JobOutcome:
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
    except InflateLimitExceeded as e:  # bad base64 or zlib: a malformed entry (parse_result_entry)
        text = f"its error text is too long to read ({e})"
    reason = {RESULT_STOPPED: "stopped", RESULT_MAX_RETRIES: "out of retries"}.get(kind, "failed")
    return JobOutcome(None, last_line(text) or f"job {reason}")


def result_fields(xread_reply: list) -> dict:
    """The fields of the one entry an `XREAD COUNT 1 STREAMS <key> ...` reply holds, raw (RESP2: a list of
    [key, entries]; RESP3: a map of key to entries) or as redis-py parses it (entries of (id, dict))."""
    (_key, entries), = xread_reply.items() if isinstance(xread_reply, dict) else xread_reply
    (_entry_id, flat), = entries[:1]
    return flat if isinstance(flat, dict) else dict(zip(flat[::2], flat[1::2]))


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


def trusted_owners(extra=()) -> frozenset[int]:
    """The owners whose result segments this process reads: itself, `extra` and $EB_TRUSTED_UIDS (comma-separated
    uids, e.g. the workers' user where a client runs as root)."""
    env = os.environ.get(TRUSTED_UIDS_ENV, "")
    try:
        from_env = {int(x) for x in env.split(",") if x.strip()}
    except ValueError:
        raise ValueError(f"${TRUSTED_UIDS_ENV} must be comma-separated uids, got {env!r}") from None
    return frozenset({os.getuid(), *from_env, *(int(u) for u in extra)})


def resolve_shm_prefix(prefix: str | None = None) -> str:
    """The prefix of the workers' segment names, the only segments a client reads: `prefix`, else $EB_SHM_PREFIX
    (as the workers' config reads it), else "eb"."""
    return check_prefix(prefix if prefix is not None else os.environ.get(SHM_PREFIX_ENV) or DEFAULT_PREFIX)


def _check_segment_name(location, prefix: str) -> None:
    """ResultLost unless `location` is a segment name a worker under `prefix` makes (shm.SegmentName): a handle
    comes through Redis or a doorbell, and a name of any other form or prefix is not ours to open or unlink."""
    parsed = SegmentName.parse(location) if isinstance(location, str) else None
    if parsed is not None and parsed.prefix == prefix:
        return
    if parsed is not None:
        raise ResultLost(f"result refused: segment {location} is named under shm prefix {parsed.prefix!r}, not "
                         f"{prefix!r}; if the workers' shm_prefix is {parsed.prefix!r}, give the client "
                         f"shm_prefix={parsed.prefix!r} (or ${SHM_PREFIX_ENV}); nothing was opened")
    raise ResultLost(f"result refused: {location!r} is not a segment name a worker makes "
                     f"(/{prefix}.<pid>.<expiry ms>.<16 hex digits>); nothing was opened")


def check_location(handle: Handle, job_id: str, prefix: str) -> Handle:
    """`handle`, once it points where job `job_id`'s result may be: a segment named under `prefix`, or the job's
    own blob key (broker.protocol.keys.blob); else ResultLost, with nothing opened, read or deleted."""
    if handle.transport == "shm":
        _check_segment_name(handle.location, prefix)
    elif not keys.is_blob_of(handle.location, job_id):
        raise ResultLost(f"result refused: blob key {handle.location!r} is not a result key of job {job_id} "
                         f"({keys.blob(job_id, '<execution>')!r}); nothing was read or deleted")
    return handle


def _check_spans(layout, nbytes: int, what: str) -> None:
    """Every prompt's states lie inside the `nbytes` a handle or blob holds (else reading them would fail
    obscurely, or read what another prompt's offsets do not describe)."""
    if layout.dtype not in TORCH_DTYPES or len(layout.shapes) != len(layout.offsets):
        raise ResultLost(f"{what} is malformed: dtype {layout.dtype!r}, {len(layout.shapes)} shapes, "
                         f"{len(layout.offsets)} offsets")
    itemsize = TORCH_DTYPES[layout.dtype].itemsize
    for shape, offset in zip(layout.shapes, layout.offsets):
        ok = (isinstance(shape, list) and len(shape) == 2 and all(_is_count(d) for d in shape) and _is_count(offset))
        if not ok or offset + shape[0] * shape[1] * itemsize > nbytes:
            raise ResultLost(f"{what} is malformed: shape {shape} at offset {offset} does not fit its {nbytes} bytes")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_shm(handle: Handle, copy: bool = True, trusted: frozenset[int] | None = None,
             prefix: str = DEFAULT_PREFIX) -> list[torch.Tensor]:
    """Reads the segment and unlinks it. With copy=False the tensors view the (unlinked) mapping directly.

    The handle came through Redis (or a doorbell), so the segment is read only if it is what a worker makes: named
    as a worker under `prefix` names its segments (before anything opens it), owned by this process's user or a
    `trusted` uid (default: trusted_owners()), mode 0600, exactly the handle's size; anything else is ResultLost
    with the reason, and is left where it is."""
    from shm import ShmNotFoundError, ShmUntrustedError, attach_segment, read_segment, unlink_segment

    _check_segment_name(handle.location, prefix)
    _check_spans(handle, handle.nbytes, f"result handle for {handle.location}")
    expect = dict(owners=trusted_owners() if trusted is None else trusted, size=max(handle.nbytes, 1))
    try:
        if copy:
            # One read of the whole segment into memory of our own. (Tensor.clone of a mapping would fault its
            # pages in one by one, and run torch's intra-op thread pool, whose spinning threads, times many
            # client processes, starve the worker on the same host.)
            ours = True
            try:
                return _split(read_segment(handle.location, **expect), handle, copy=False)
            except ShmUntrustedError:
                ours = False  # not a worker's segment for us: not ours to remove
                raise
            finally:
                if ours:
                    unlink_segment(handle.location)
        seg = attach_segment(handle.location, **expect)
    except ShmNotFoundError:
        raise ResultLost(
            f"shared-memory segment {handle.location} is gone: it expired (at {handle.expires_at:.0f}) "
            "or was swept before this client read it"
        ) from None
    except ShmUntrustedError as e:
        raise ResultLost(f"result refused: {e}") from None
    try:
        return [seg.torch(off, shape, TORCH_DTYPES[handle.dtype]) for shape, off in zip(handle.shapes, handle.offsets)]
    finally:
        seg.unlink()
        seg.close()


def discard_result(handle_bytes: bytes, prefix: str = DEFAULT_PREFIX) -> None:
    """Unlinks the segment of a result nobody will read (a doorbell ring for a job its client no longer waits
    for); anything that is not a handle to a segment named under `prefix`, or a segment already gone, is left
    alone."""
    from shm import ShmError, unlink_segment

    try:
        handle = Handle.from_msgpack(handle_bytes)
    except ProtocolError:
        return
    if handle.transport == "shm" and isinstance(handle.location, str) \
            and SegmentName.parse(handle.location, prefix) is not None:
        try:
            unlink_segment(handle.location)
        except ShmError:
            pass


def read_blob(raw: bytes | None, handle: Handle) -> list[torch.Tensor]:
    if raw is None:
        raise ResultLost(f"result blob {handle.location} is gone: it expired before this client read it")
    blob = Blob.from_msgpack(raw)
    _check_spans(blob, len(blob.data) if isinstance(blob.data, bytes) else -1, f"result blob {handle.location}")
    return _split(bytearray(blob.data), blob, copy=False)  # the bytearray is ours alone: no copy needed
