-- A worker says it is alive; each heartbeat also forgets the workers that have stopped beating, so the set
-- stays as small as the fleet.
--
-- KEYS: the workers (a sorted set by last beat), their info (a hash). ARGV: this worker's id, its info, the
-- seconds after which a silent worker is gone.
local workers, infos = KEYS[1], KEYS[2]
local worker, info, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
redis.call('ZADD', workers, now, worker)
redis.call('HSET', infos, worker, info)
local gone = redis.call('ZRANGEBYSCORE', workers, '-inf', now - ttl)
for _, old in ipairs(gone) do
  redis.call('ZREM', workers, old)
  redis.call('HDEL', infos, old)
end
