"""Every Redis key name the broker uses, built here and nowhere else (Lua scripts get theirs as KEYS, or as the
prefixes of `PREFIXES` for keys named by job ids they read inside Redis).

RQ's own layout (rq-dashboard, `rq info` and RQ's cleanup read these): rq:queue:<q> and rq:queues, rq:job:<id>,
rq:wip:<q> (the started registry), rq:finished:<q>, rq:failed:<q>, rq:results:<id>, rq:execution:<id>:<exec>,
rq:executions:<id>, rq:worker:<name>:executions. Ours: eb:wake:<q>, eb:bound:<q>, eb:stats:<q>:<worker>,
eb:latency:<q>, eb:blob:<id>:<execution id>.
"""

from __future__ import annotations

import re

QUEUES_SET = "rq:queues"
JOB_PREFIX = "rq:job:"
RESULTS_PREFIX = "rq:results:"
EXECUTION_PREFIX = "rq:execution:"
EXECUTIONS_PREFIX = "rq:executions:"
BLOB_PREFIX = "eb:blob:"
# What scripts using broker/protocol/lua/rq.lua get as their first ARGV (see broker.protocol.scripts).
PREFIXES = (JOB_PREFIX, RESULTS_PREFIX, EXECUTION_PREFIX, EXECUTIONS_PREFIX)


def job(job_id: str) -> str:
    return JOB_PREFIX + job_id


def results(job_id: str) -> str:
    """RQ's result stream of a job: a waiting client's XREAD blocks on it."""
    return RESULTS_PREFIX + job_id


def execution(job_id: str, exec_id: str) -> str:
    return f"{EXECUTION_PREFIX}{job_id}:{exec_id}"


def blob(job_id: str, exec_id: str) -> str:
    """A result blob: one per execution of the job, so that a second run's result (dropped:
    broker/protocol/lua/record.lua) is deleted without touching the first's."""
    return f"{BLOB_PREFIX}{job_id}:{exec_id}"


def is_blob_of(key: str, job_id: str) -> bool:
    """Whether `key` is a result blob of job `job_id` (of any of its executions)."""
    head = f"{BLOB_PREFIX}{job_id}:"
    return key.startswith(head) and re.fullmatch(r"[A-Za-z0-9_-]+", key[len(head):]) is not None


def worker_executions(worker: str) -> str:
    """The executions a worker holds (RQ's set: TAKE adds, RECORD removes)."""
    return f"rq:worker:{worker}:executions"


class QueueKeys:
    """The keys of one queue."""

    def __init__(self, queue: str):
        self.name = queue
        self.queue = f"rq:queue:{queue}"
        self.started = f"rq:wip:{queue}"
        self.finished = f"rq:finished:{queue}"
        self.failed = f"rq:failed:{queue}"
        self.workers = f"rq:workers:{queue}"
        # One token per job pushed (at most broker.protocol.scripts.MAX_WAKE_TOKENS): an idle worker blocks on it
        # with its take pipelined behind, so a job is taken in the round trip that wakes the worker
        # (workers.job_source).
        self.wake = f"eb:wake:{queue}"
        # Where workers publish their max_queue_depth for clients' admission (broker.protocol.enqueue).
        self.bound = f"eb:bound:{queue}"
        self.latency = f"eb:latency:{queue}"  # the last 2000 jobs' latencies (ms), for `broker stats`

    def stats(self, worker: str) -> str:
        """A worker's counters and batch-size histogram (workers.stats)."""
        return f"eb:stats:{self.name}:{worker}"
