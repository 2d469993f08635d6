-- Batches taken from the pending list and leased in the same step: if the transaction that took them never
-- commits (its worker killed, Redis gone before the reply), the sweeper puts them back when the lease ends.
-- Their own messages cannot be relied on: Redis loses a message it handed out just before crashing, and
-- Celery drops a message whose retry it could not enqueue. Batches already applied and deleted are dropped
-- from the list here. (The batch keys are not declared: the Celery Redis transport needs a single Redis, not
-- a cluster, anyway.)
--
-- KEYS: pending list, leases. ARGV: how many, lease seconds.
local pending, leases, how_many, lease_seconds = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local taken = redis.call('LPOP', pending, how_many)
if not taken then return {} end
local until_ = tonumber(redis.call('TIME')[1]) + tonumber(lease_seconds)
local out = {}
for _, key in ipairs(taken) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('ZADD', leases, until_, key)
    out[#out + 1] = key
  end
end
return out
