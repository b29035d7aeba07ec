-- RECORD: ends a batch's jobs as RQ does, then adds the batch's counters to the worker's stats. A client
-- waiting on a result stream is answered once this whole script has run. A job that has a successful result
-- already (run twice: its client enqueued it again after Redis lost it) keeps that one: this run's execution
-- ends, nothing else is written, and it is counted as duplicate_results in the worker's stats.
-- KEYS: started registry, finished registry, failed registry, the worker's executions set, the worker's stats
--       hash, the queue's latency list.
-- ARGS: result ttl, worker name, #done, #failed, #stat pairs, then per done job: id, execution id, return value
--       (b64 of msgpack, RQ's result format); per failed job: id, execution id, exc_string (b64 of zlib, RQ's
--       format), exc_info (zlib); the stat field/increment pairs; the jobs' latencies (ms).
-- KEYS and ARGS are built by broker.protocol.scripts.record_args: change the two together.
-- Returns the ids of the jobs skipped so (the worker removes their results' segments and blobs).
local now, now_text = rq_now()  -- the clock that stamped started_at (TAKE)
local ttl, worker = tonumber(ARGS[1]), ARGS[2]
local n_done, n_failed, n_stats = tonumber(ARGS[3]), tonumber(ARGS[4]), tonumber(ARGS[5])
local skipped = {}

-- Whether job `id` has a successful result (RQ's type 1) in its stream (capped at 10 entries: all are read).
local function answered(id)
  for _, entry in ipairs(redis.call('XRANGE', RESULTS .. id, '-', '+')) do
    local f = entry[2]
    for i = 1, #f - 1, 2 do
      if f[i] == 'type' and f[i + 1] == '1' then return true end
    end
  end
  return false
end

-- Ends the execution of an answered job, whose status TAKE set to started again.
local function skip(id)
  local jkey = JOB .. id
  redis.call('HSET', jkey, 'status', 'finished')
  redis.call('EXPIRE', jkey, ttl)
  skipped[#skipped + 1] = id
end

local a = 6
for _ = 1, n_done do
  if answered(ARGS[a]) then
    skip(ARGS[a])
  else
    end_job(now, now_text, {id = ARGS[a], exec_id = ARGS[a + 1], status = 'finished', extra = {}, type = '1',
                            field = 'return_value', result = ARGS[a + 2], registry = KEYS[2], ttl = ttl,
                            worker = worker})
  end
  end_execution(ARGS[a], ARGS[a + 1], KEYS[1], KEYS[4])
  a = a + 3
end
for _ = 1, n_failed do
  if answered(ARGS[a]) then
    skip(ARGS[a])
  else
    end_job(now, now_text, {id = ARGS[a], exec_id = ARGS[a + 1], status = 'failed',
                            extra = {'exc_info', ARGS[a + 3]}, type = '2', field = 'exc_string', result = ARGS[a + 2],
                            registry = KEYS[3], ttl = ttl, worker = worker})
  end
  end_execution(ARGS[a], ARGS[a + 1], KEYS[1], KEYS[4])
  a = a + 4
end
if #skipped > 0 then
  redis.call('HINCRBY', KEYS[5], 'duplicate_results', #skipped)
  redis.call('EXPIRE', KEYS[5], 86400)
end
if n_stats > 0 then
  for _ = 1, n_stats do
    redis.call('HINCRBYFLOAT', KEYS[5], ARGS[a], ARGS[a + 1])
    a = a + 2
  end
  redis.call('HSET', KEYS[5], 'last_batch_at', now)
  redis.call('EXPIRE', KEYS[5], 86400)
end
if a <= #ARGS then
  redis.call('LPUSH', KEYS[6], unpack(ARGS, a))
  redis.call('LTRIM', KEYS[6], 0, 1999)
  redis.call('EXPIRE', KEYS[6], 86400)
end
return skipped
