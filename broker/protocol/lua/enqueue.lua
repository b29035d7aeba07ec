-- ENQUEUE: pushes one job, admitted only while the queue is shorter than its bound, and wakes a worker.
-- KEYS: queue list, job hash, rq:queues, the queue's bound (published by its workers), its wake-up list; for a job
--       enqueued again (its client found it gone from Redis: restarted empty, or failed over), its result stream.
-- ARGV: bound (0: the workers' published one, itself 0 = unbounded; -1: none), job ttl (s), job id, the hash's
--       field/value pairs as one msgpack array (one argument, not ~34: the client packs each argument in Python,
--       and this runs before every job can start), most wake-up tokens kept.
-- KEYS and ARGV are built by broker.protocol.scripts.enqueue_args: change the two together.
-- Returns the queue length after the push, -(bound) - 1 when refused, or 0 for a job enqueued again that Redis
-- knows after all (its hash or its result stream exists: a worker recorded it meanwhile): nothing is pushed.
if KEYS[6] and redis.call('EXISTS', KEYS[2], KEYS[6]) > 0 then return 0 end
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
redis.call('LPUSH', KEYS[5], '1')
redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[5]) - 1)
return n
