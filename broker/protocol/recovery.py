"""Jobs whose worker died: retried while they have retries left, else failed with a clear error.

A worker keeps its jobs' entries in RQ's started registry (rq:wip:<queue>, scored by a heartbeat deadline) fresh
while it runs them. An entry past its deadline means the worker stopped (killed,
crashed, lost its host). broker/protocol/lua/recover.lua, run by every worker's housekeeping and by a waiting client for
its own job, writes what RQ's own cleanup writes (status, failed registry, a failure result in the job's result
stream), so clients and rq-dashboard see the same.
"""

from __future__ import annotations

import base64
import zlib

from broker.protocol.keys import QueueKeys

ABANDONED_MESSAGE = (
    "AbandonedJob: the encoder worker running this job stopped (no heartbeat) and the job has no retries left"
)


def rq_failure(message: str) -> tuple[bytes, bytes]:
    """(exc_string, exc_info) as RQ stores a failure: b64 of zlib, and zlib."""
    exc = zlib.compress(message.encode())
    return base64.b64encode(exc), exc


def recover_args(queue: str, job_id: str = "", failure_ttl: int = 60) -> tuple[list, list]:
    """KEYS and ARGS of broker/protocol/lua/recover.lua: every expired entry of `queue`, or only `job_id`'s."""
    q = QueueKeys(queue)
    return [q.started, q.queue, q.failed, q.wake], [failure_ttl, *rq_failure(ABANDONED_MESSAGE), job_id]
