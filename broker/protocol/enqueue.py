"""RQ-compatible job records, written in one round trip (broker/protocol/lua/enqueue.lua, its arguments built by
broker.protocol.scripts.enqueue_args) by sync and asyncio clients.

Jobs are ordinary RQ jobs (hash rq:job:<id>, id pushed on rq:queue:<name>), so rq-dashboard and `rq info`
read them, but the data is msgpack and the only function named is ENCODE_FUNCTION. The hash is built here
field by field, as RQ's Job.to_dict writes it, without RQ's Job object (which costs more than the enqueue).
"""

from __future__ import annotations

import uuid
import zlib
from datetime import datetime, timezone

from broker.protocol.queues import ENCODE_FUNCTION
from broker.protocol.serializer import MsgpackSerializer


def rq_time(t: datetime | None = None) -> str:
    """RQ's timestamp format (rq.utils.utcformat)."""
    return (t or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_job_id() -> str:
    return uuid.uuid4().hex


def new_job_mapping(payload: bytes, queue: str, *, function: str = ENCODE_FUNCTION, job_timeout: int,
                    result_ttl: int, failure_ttl: int, ttl: int, retries: int,
                    description: str = "", job_id: str | None = None) -> tuple[str, dict]:
    """(job id, the job hash's fields) as RQ's Queue.enqueue_call writes them for `function(payload)`."""
    stamp = rq_time()
    mapping = {
        "created_at": stamp,
        "data": zlib.compress(MsgpackSerializer.dumps([function, None, [payload], {}])),
        "success_callback_name": "", "failure_callback_name": "", "stopped_callback_name": "",
        "started_at": "", "ended_at": "", "last_heartbeat": "", "worker_name": "", "group_id": "",
        "origin": queue,
        "description": description or function,
        "enqueued_at": stamp,
        "timeout": job_timeout,
        "result_ttl": result_ttl,
        "failure_ttl": failure_ttl,
        "status": "queued",
        "ttl": ttl,
    }
    if retries > 0:
        mapping.update(retries_left=retries, retry_intervals="[0]")
    return job_id or new_job_id(), mapping
