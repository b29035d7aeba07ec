"""Jobs whose worker died: retried while they have retries left, else failed with a clear error.

A worker keeps its jobs' entries in RQ's started registry (rq:wip:<queue>, scored by a heartbeat deadline) fresh
while it runs them. An entry past its deadline means the worker stopped (killed, crashed, lost its host). This
script, run by every worker's maintenance and by a waiting client for its own job, handles such entries
atomically, so two cleaners never requeue one job twice. It writes what RQ's own cleanup writes (status,
failed registry, a failure result in the job's result stream), so clients and rq-dashboard see the same.
"""

from __future__ import annotations

import base64
import time
import zlib

from broker.enqueue import wake_key

ABANDONED_MESSAGE = (
    "AbandonedJob: the encoder worker running this job stopped (no heartbeat) and the job has no retries left"
)
ABANDONED_EXC_B64 = base64.b64encode(zlib.compress(ABANDONED_MESSAGE.encode())).decode()

# KEYS: started registry, queue list, failed registry, the queue's wake-up list (broker.enqueue.wake_key).
# ARGV: now, failure ttl, exc_string (b64 of zlib, RQ's result format), exc_info (zlib), only this job id or ''.
# Returns {requeued, failed}.
RECOVER_SCRIPT = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local requeued, failed = 0, 0
for _, entry in ipairs(expired) do
  local sep = string.find(entry, ':', 1, true)
  local job_id = sep and string.sub(entry, 1, sep - 1) or entry
  if ARGV[5] == '' or ARGV[5] == job_id then
    redis.call('ZREM', KEYS[1], entry)
    if sep then
      redis.call('DEL', 'rq:execution:' .. entry)
      redis.call('ZREM', 'rq:executions:' .. job_id, string.sub(entry, sep + 1))
    end
    local jkey = 'rq:job:' .. job_id
    if redis.call('HGET', jkey, 'status') == 'started' then
      local left = tonumber(redis.call('HGET', jkey, 'retries_left') or '0') or 0
      if left > 0 then
        redis.call('HSET', jkey, 'status', 'queued', 'retries_left', left - 1)
        redis.call('HINCRBY', jkey, 'number_of_retries', 1)
        redis.call('RPUSH', KEYS[2], job_id)
        redis.call('LPUSH', KEYS[4], '1')
        requeued = requeued + 1
      else
        local ttl = tonumber(ARGV[2])
        redis.call('HSET', jkey, 'status', 'failed', 'exc_info', ARGV[4])
        redis.call('EXPIRE', jkey, ttl)
        redis.call('ZADD', KEYS[3], tonumber(ARGV[1]) + ttl, job_id)
        local rkey = 'rq:results:' .. job_id
        redis.call('XADD', rkey, 'MAXLEN', '10', '*', 'type', '2', 'worker_name', '', 'exc_string', ARGV[3])
        redis.call('EXPIRE', rkey, ttl)
        failed = failed + 1
      end
    end
  end
end
return {requeued, failed}
"""


def recover_args(queue: str, job_id: str = "", failure_ttl: int = 60) -> tuple[list, list]:
    keys = [f"rq:wip:{queue}", f"rq:queue:{queue}", f"rq:failed:{queue}", wake_key(queue)]
    argv = [time.time(), failure_ttl, ABANDONED_EXC_B64, zlib.compress(ABANDONED_MESSAGE.encode()), job_id]
    return keys, argv
