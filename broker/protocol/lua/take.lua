-- TAKE: takes up to ARGS[1] ids off the queue and marks each job started, as RQ's worker does.
-- KEYS: queue list, started registry (rq:wip:<q>), the worker's executions set, the queue's wake-up list,
--       failed registry.
-- ARGS: how many ids, worker name, heartbeat ttl (s), execution id prefix, failure ttl, and for a job whose id
--       is not an RQ job id: its exc_string (b64 of zlib, RQ's format) and exc_info (zlib).
-- KEYS and ARGS are built by broker.protocol.scripts.take_args: change the two together.
-- Returns 5 fields per id: id, execution id, enqueued_at, data, meta for a job started; id, '', the reason, '',
-- '' for an id dropped (no job hash, or a key of another type) or failed here (an id RQ would not make:
-- letters, digits, '_' and '-' only). A script runs whole and moves ids nowhere else, so none is stranded.
-- Empties the wake-up list once the queue is empty (no worker needs waking for jobs already taken).
local ids = tonumber(ARGS[1]) > 0 and redis.call('LPOP', KEYS[1], tonumber(ARGS[1])) or {}
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[4]) end
local now, now_text = rq_now()
local worker, ttl = ARGS[2], tonumber(ARGS[3])
local out = {}
local function emit(a, b, c, d, e)
  out[#out + 1] = a; out[#out + 1] = b; out[#out + 1] = c; out[#out + 1] = d; out[#out + 1] = e
end
for i, id in ipairs(ids) do
  local jkey = JOB .. id
  local kind = redis.call('TYPE', jkey).ok
  if kind ~= 'hash' then
    emit(id, '', kind == 'none' and 'its job record is gone (expired)' or 'its job record is a ' .. kind, '', '')
  elseif not string.find(id, '^[%w_%-]+$') then
    end_job(now, now_text, {id = id, exec_id = '', status = 'failed', extra = {'exc_info', ARGS[7]}, type = '2',
                            field = 'exc_string', result = ARGS[6], registry = KEYS[5], ttl = tonumber(ARGS[5]),
                            worker = worker})
    emit(id, '', 'its id is not an RQ job id: failed', '', '')
  else
    local fields = redis.call('HMGET', jkey, 'enqueued_at', 'data', 'meta')
    local exec_id = ARGS[4] .. i
    local composite = id .. ':' .. exec_id
    redis.call('HSET', jkey, 'status', 'started', 'started_at', now_text, 'last_heartbeat', now_text,
               'worker_name', worker)
    redis.call('PERSIST', jkey)
    redis.call('HSET', EXECUTION .. composite, 'id', exec_id, 'job_id', id, 'created_at', now, 'last_heartbeat',
               now, 'worker_name', worker)
    redis.call('EXPIRE', EXECUTION .. composite, ttl)
    redis.call('ZADD', EXECUTIONS .. id, math.floor(now) + ttl + 60, exec_id)
    redis.call('EXPIRE', EXECUTIONS .. id, ttl + 60)
    redis.call('ZADD', KEYS[2], now + ttl, composite)
    redis.call('SADD', KEYS[3], composite)
    emit(id, exec_id, fields[1] or '', fields[2] or '', fields[3] or '')
  end
end
if #ids > 0 then redis.call('EXPIRE', KEYS[3], ttl + 60) end
return out
