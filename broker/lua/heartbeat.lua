-- HEARTBEAT: keeps fresh the started-registry entry and the execution record of every job a worker holds (its
-- executions set, which TAKE fills and RECORD empties): nothing in the worker's process needs to know which.
-- KEYS: started registry, the worker's executions set.
-- ARGS: heartbeat ttl (s).
local now = rq_now()
local ttl = tonumber(ARGS[1])
local held = redis.call('SMEMBERS', KEYS[2])
for _, composite in ipairs(held) do
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, composite)
  redis.call('EXPIRE', EXECUTION .. composite, ttl + 60)
end
if #held > 0 then redis.call('EXPIRE', KEYS[2], ttl + 60) end
return #held
