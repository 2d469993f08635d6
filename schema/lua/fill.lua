-- A run's or thread's state hash, rebuilt from PostgreSQL, created only if it is missing: a rebuild never
-- overwrites counts that the enqueue scripts are keeping.
--
-- KEYS: the hash. ARGV: its ttl, then field/value pairs.
local hash, ttl = KEYS[1], ARGV[1]
if redis.call('EXISTS', hash) == 1 then return 0 end
redis.call('HSET', hash, unpack(ARGV, 2))
redis.call('EXPIRE', hash, ttl)
return 1
