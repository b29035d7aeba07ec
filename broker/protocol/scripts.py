"""The broker's Lua scripts (broker/protocol/lua/*.lua), loaded here, and each script's KEYS and ARGS built here
from named arguments in the order its header's contract lists them: `scripts.call("take", *take_args(...))`.
A script and its builder change together.

Scripts that read or write jobs by id have broker/protocol/lua/rq.lua put before them and get the key prefixes of
broker.protocol.keys.PREFIXES as their first arguments (a script never spells a key name), added by `LuaScript.args`.
"""

from __future__ import annotations

import base64
import functools
import zlib
from dataclasses import dataclass
from pathlib import Path

import msgpack

from broker.protocol import keys
from broker.protocol.serializer import MsgpackSerializer

LUA_DIR = Path(__file__).with_name("lua")
RQ_LIB = (LUA_DIR / "rq.lua").read_text()
WITH_RQ_LIB = ("take", "record", "recover")
NAMES = ("enqueue", *WITH_RQ_LIB)

# Most waiting workers a queue's wake-up list can wake at once.
MAX_WAKE_TOKENS = 64
BAD_ID_MESSAGE = "InvalidRequest: a job id must be letters, digits, '_' and '-' (RQ's job ids)"
ABANDONED_MESSAGE = (
    "AbandonedJob: the encoder worker running this job stopped (no heartbeat) and the job has no retries left"
)


@dataclass(frozen=True, slots=True)
class LuaScript:
    name: str
    source: str
    with_lib: bool

    def args(self, args) -> list:
        """The script's ARGV: `args`, after the key prefixes when it uses rq.lua."""
        return [*keys.PREFIXES, *args] if self.with_lib else list(args)

    def on_pipeline(self, pipe, keys_: list, args: list) -> None:
        """Queues the script on `pipe` (by its text: a pipeline of EVALSHAs would first ask Redis whether they
        exist, a round trip of its own)."""
        pipe.execute_command("EVAL", self.source, len(keys_), *keys_, *self.args(args))


def _load(name: str) -> LuaScript:
    text = (LUA_DIR / f"{name}.lua").read_text()
    with_lib = name in WITH_RQ_LIB
    return LuaScript(name, RQ_LIB + text if with_lib else text, with_lib)


SCRIPTS = {name: _load(name) for name in NAMES}


class Scripts:
    """Every script registered on one client, sync or asyncio: `scripts.call("take", keys, args)` (EVALSHA, and
    EVAL when Redis lost it)."""

    def __init__(self, client):
        self._registered = {name: (s, client.register_script(s.source)) for name, s in SCRIPTS.items()}

    def call(self, name: str, keys_: list, args: list):
        """The script's reply (a coroutine for an asyncio client)."""
        script, registered = self._registered[name]
        return registered(keys=keys_, args=script.args(args))


def rq_failure(message: str) -> tuple[bytes, bytes]:
    """(exc_string, exc_info) as RQ stores a failure: b64 of zlib, and zlib."""
    exc = zlib.compress(message.encode())
    return base64.b64encode(exc), exc


_BAD_ID_FAILURE = rq_failure(BAD_ID_MESSAGE)
_ABANDONED_FAILURE = rq_failure(ABANDONED_MESSAGE)
_queue_keys = functools.lru_cache(maxsize=256)(keys.QueueKeys)  # built once per queue, not per call


# -- each script's KEYS and ARGS, in its header's order ------------------------------------------------------
def enqueue_args(job_id: str, mapping: dict, queue: str, bound: int, ttl: int,
                 again: bool = False) -> tuple[list, list]:
    """ENQUEUE (lua/enqueue.lua): job `job_id` with hash fields `mapping` (broker.protocol.enqueue.new_job_mapping)
    pushed on `queue`, refused past `bound` (0: the workers' published bound), its hash expiring after `ttl` s.
    `again`: the job was enqueued before and Redis lost it; it is pushed only while Redis still knows nothing of
    it, and past any bound (it was admitted once)."""
    q = _queue_keys(queue)
    fields = []
    for k, v in mapping.items():
        fields.extend((k, v))
    keys_ = [q.queue, keys.job(job_id), keys.QUEUES_SET, q.bound, q.wake]
    if again:
        keys_.append(keys.results(job_id))
    # Redis's Lua cmsgpack reads only msgpack's original raw strings: no bin type.
    return keys_, [-1 if again else bound, ttl, job_id, msgpack.packb(fields, use_bin_type=False), MAX_WAKE_TOKENS]


def take_args(queue: str, worker: str, count: int, heartbeat_ttl: int, exec_prefix: str,
              failure_ttl: int = 60) -> tuple[list, list]:
    """TAKE (lua/take.lua): up to `count` jobs of `queue` started by `worker` for `heartbeat_ttl` s, their
    execution ids `exec_prefix` and a number; an id RQ would not make is failed (kept `failure_ttl` s)."""
    q = _queue_keys(queue)
    return ([q.queue, q.started, keys.worker_executions(worker), q.wake, q.failed],
            [max(0, count), worker, heartbeat_ttl, exec_prefix, failure_ttl, *_BAD_ID_FAILURE])


def record_args(queue: str, worker: str, result_ttl: int, done, failed, increments: dict,
                latencies_ms: list) -> tuple[list, list]:
    """RECORD (lua/record.lua): `done` jobs, as (job id, execution id, return value), finished with their return
    value (msgpack'd); `failed` ones, as (job id, execution id, reason), failed with their reason; both kept
    `result_ttl` s. Adds `increments` (field: amount) to `worker`'s stats and `latencies_ms` to the queue's list."""
    q = _queue_keys(queue)
    argv: list = [result_ttl, worker, len(done), len(failed), len(increments)]
    for job_id, exec_id, value in done:
        argv += [job_id, exec_id, base64.b64encode(MsgpackSerializer.dumps(value))]
    for job_id, exec_id, reason in failed:
        argv += [job_id, exec_id, *rq_failure(reason)]
    for k, v in increments.items():
        argv += [k, v]
    argv += [round(x, 3) for x in latencies_ms]
    return [q.started, q.finished, q.failed, keys.worker_executions(worker), q.stats(worker), q.latency], argv


def recover_args(queue: str, job_id: str = "", failure_ttl: int = 60) -> tuple[list, list]:
    """RECOVER (lua/recover.lua): every entry of `queue`'s started registry past its heartbeat deadline, or only
    `job_id`'s, retried while its job has retries left, else failed as abandoned (kept `failure_ttl` s).

    A worker keeps its jobs' entries in RQ's started registry (scored by a heartbeat deadline) fresh while it runs
    them; an entry past its deadline means the worker stopped (killed, crashed, lost its host). RECOVER, run by
    every worker's housekeeping and by a waiting client for its own job, writes what RQ's own cleanup writes
    (status, failed registry, a failure result in the job's result stream), so clients and rq-dashboard see the
    same."""
    q = _queue_keys(queue)
    return [q.started, q.queue, q.failed, q.wake], [failure_ttl, *_ABANDONED_FAILURE, job_id]
