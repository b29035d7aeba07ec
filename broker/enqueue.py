"""RQ-compatible job records, written in one round trip by sync and asyncio clients alike.

Jobs are ordinary RQ jobs (hash rq:job:<id>, id pushed on rq:queue:<name>), so rq-dashboard and `rq info`
read them, but the data is msgpack and the only function named is ENCODE_FUNCTION. The hash is built here
field by field, as RQ's Job.to_dict writes it, without RQ's Job object (which costs more than the enqueue).
"""

from __future__ import annotations

import uuid
import zlib
from datetime import datetime, timezone

import msgpack

from broker.queues import ENCODE_FUNCTION
from broker.serializer import MsgpackSerializer

QUEUES_SET = "rq:queues"

# Most waiting workers a queue's wake-up list can wake at once (see wake_key).
MAX_WAKE_TOKENS = 64

# Atomic admission: a job is pushed only while the queue is shorter than the bound: the client's own (ARGV[1])
# or, when that is 0, the one the queue's workers publish (KEYS[4], see queue_bound_key); 0 = unbounded.
# KEYS: queue list, job hash, rq:queues, bound key, wake-up list (see wake_key), the job's hand-on mark.
# ARGV: bound, ttl, job id, the hash's field/value pairs as one msgpack array (one argument instead of ~34: the
# client packs each argument in Python, and this runs before every job can start), whether to push a wake-up
# token ('1'; '0' when the client rang a worker on its host instead, see broker.doorbell: then only if that
# worker handed the job on before it was enqueued, see HAND_ON_SCRIPT).
# Returns the queue length after the push, or -(bound) - 1 when refused.
ENQUEUE_SCRIPT = """
local bound = tonumber(ARGV[1])
if bound == 0 then bound = tonumber(redis.call('GET', KEYS[4]) or '0') or 0 end
if bound > 0 and redis.call('LLEN', KEYS[1]) >= bound then
  return -bound - 1
end
redis.call('HSET', KEYS[2], unpack(cmsgpack.unpack(ARGV[4])))
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
redis.call('SADD', KEYS[3], KEYS[1])
local n = redis.call('RPUSH', KEYS[1], ARGV[3])
if ARGV[5] ~= '0' or redis.call('DEL', KEYS[6]) == 1 then
  redis.call('LPUSH', KEYS[5], '1')
  redis.call('LTRIM', KEYS[5], 0, %d)
end
return n
""" % (MAX_WAKE_TOKENS - 1)

# A worker rung with jobs it will not run itself hands them on to any worker (a ring comes before its job's
# enqueue, which then pushes no wake-up token): a job already enqueued gets a token now; one not yet enqueued
# is marked, and its enqueue pushes the token.
# KEYS: wake-up list. ARGV: mark ttl (s), then job ids.
HAND_ON_SCRIPT = """
for i = 2, #ARGV do
  if redis.call('EXISTS', 'rq:job:' .. ARGV[i]) == 1 then
    redis.call('LPUSH', KEYS[1], '1')
    redis.call('LTRIM', KEYS[1], 0, %d)
  else
    redis.call('SET', 'eb:handon:' .. ARGV[i], '1', 'EX', tonumber(ARGV[1]))
  end
end
return #ARGV - 1
""" % (MAX_WAKE_TOKENS - 1)


def queue_key(queue: str) -> str:
    return f"rq:queue:{queue}"


def queue_bound_key(queue: str) -> str:
    """Where workers publish their queue's depth bound (config max_queue_depth) for clients' admission."""
    return f"eb:bound:{queue}"


def wake_key(queue: str) -> str:
    """One token per job pushed (at most MAX_WAKE_TOKENS): an idle worker blocks on this list with its take
    pipelined behind the block, so a job is taken in the same round trip that wakes the worker
    (workers.job_source); the take empties the list once the queue is empty."""
    return f"eb:wake:{queue}"


def job_key(job_id: str) -> str:
    return f"rq:job:{job_id}"


def hand_on_key(job_id: str) -> str:
    """Set by HAND_ON_SCRIPT for a rung job not yet enqueued: its enqueue then pushes a wake-up token."""
    return f"eb:handon:{job_id}"


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


def enqueue_args(job_id: str, mapping: dict, queue: str, bound: int, ttl: int,
                 wake: bool = True) -> tuple[list, list]:
    keys = [queue_key(queue), job_key(job_id), QUEUES_SET, queue_bound_key(queue), wake_key(queue),
            hand_on_key(job_id)]
    fields = []
    for k, v in mapping.items():
        fields.extend((k, v))
    # Redis's Lua cmsgpack reads only msgpack's original raw strings: no bin type.
    return keys, [bound, ttl, job_id, msgpack.packb(fields, use_bin_type=False), "1" if wake else "0"]
