-- RECOVER: jobs whose worker stopped heart-beating (their started-registry entry is past its deadline) are
-- requeued while they have retries left, else failed as RQ's cleanup fails them. Run by every worker's
-- housekeeping and by a waiting client for its own job; atomic, so two cleaners never requeue one job twice.
-- KEYS: started registry, queue list, failed registry, the queue's wake-up list.
-- ARGS: failure ttl, exc_string (b64 of zlib, RQ's result format), exc_info (zlib), only this job id or ''.
-- KEYS and ARGS are built by broker.protocol.scripts.recover_args: change the two together.
-- Returns {requeued, failed}; with a job id, a third element: 1 while Redis knows that job (its hash or its result
-- stream exists), 0 once it lost it (restarted empty, or failed over to a replica that never had it).
local now, now_text = rq_now()
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
local requeued, failed = 0, 0
for _, entry in ipairs(expired) do
  local sep = string.find(entry, ':', 1, true)
  local job_id = sep and string.sub(entry, 1, sep - 1) or entry
  if ARGS[4] == '' or ARGS[4] == job_id then
    redis.call('ZREM', KEYS[1], entry)
    end_execution(job_id, sep and string.sub(entry, sep + 1) or '', KEYS[1], nil)
    local jkey = JOB .. job_id
    if redis.call('TYPE', jkey).ok == 'hash' and redis.call('HGET', jkey, 'status') == 'started' then
      local left = tonumber(redis.call('HGET', jkey, 'retries_left') or '0') or 0
      if left > 0 then
        redis.call('HSET', jkey, 'status', 'queued', 'retries_left', left - 1)
        redis.call('HINCRBY', jkey, 'number_of_retries', 1)
        redis.call('RPUSH', KEYS[2], job_id)
        redis.call('LPUSH', KEYS[4], '1')
        requeued = requeued + 1
      else
        end_job(now, now_text, {id = job_id, exec_id = '', status = 'failed', extra = {'exc_info', ARGS[3]},
                                type = '2', field = 'exc_string', result = ARGS[2], registry = KEYS[3],
                                ttl = tonumber(ARGS[1]), worker = ''})
        failed = failed + 1
      end
    end
  end
end
if ARGS[4] ~= '' then
  return {requeued, failed, redis.call('EXISTS', JOB .. ARGS[4], RESULTS .. ARGS[4]) > 0 and 1 or 0}
end
return {requeued, failed}
