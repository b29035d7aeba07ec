-- rq.lua: what the scripts that read or write jobs by id share; broker.protocol.scripts puts it before each of them.
-- ARGV[1..4]: the key prefixes of broker.protocol.keys.PREFIXES (job hash, result stream, execution, executions of a
-- job); a script's own arguments are ARGS[1..] (ARGV[5..]).
local JOB, RESULTS, EXECUTION, EXECUTIONS = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ARGS = {}
for i = 5, #ARGV do ARGS[i - 4] = ARGV[i] end

-- Redis's clock as (unix seconds, RQ's text form): a take pipelined behind a blocking wait runs when the wait
-- ends, so the time must be read here, not when the worker sent it.
local function rq_now()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  local days, sod = math.floor(s / 86400), s % 86400
  local z = days + 719468  -- civil date from days since 1970-01-01 (H. Hinnant's algorithm)
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return s + us / 1e6, string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06dZ', y, m, d, math.floor(sod / 3600),
                                     math.floor(sod % 3600 / 60), sod % 60, us)
end

-- Ends execution `exec_id` of job `id` ('' = none): its record, its started-registry entry and set memberships.
local function end_execution(id, exec_id, started, worker_executions)
  if exec_id == '' then return end
  local composite = id .. ':' .. exec_id
  redis.call('DEL', EXECUTION .. composite)
  redis.call('ZREM', started, composite)
  redis.call('ZREM', EXECUTIONS .. id, exec_id)
  if worker_executions then redis.call('SREM', worker_executions, composite) end
end

-- Ends a job as RQ does: status, its result entry (RQ's result types: 1 finished, 2 failed), a registry.
-- `job` = {id, exec_id, status, extra hash fields, result type, result field, result, registry, ttl, worker}.
local function end_job(now, now_text, job)
  local jkey, rkey = JOB .. job.id, RESULTS .. job.id
  redis.call('HSET', jkey, 'status', job.status, 'ended_at', now_text, unpack(job.extra))
  redis.call('EXPIRE', jkey, job.ttl)
  redis.call('XADD', rkey, 'MAXLEN', '10', '*', 'type', job.type, 'worker_name', job.worker, job.field, job.result,
             'execution_id', job.exec_id)
  redis.call('EXPIRE', rkey, job.ttl)
  redis.call('ZADD', job.registry, now + job.ttl, job.id)
end
