-- Batches whose lease ended back at the head of the pending list (their transaction never committed).
--
-- KEYS: leases, pending list.
local leases, pending = KEYS[1], KEYS[2]
local ended = redis.call('ZRANGEBYSCORE', leases, '-inf', redis.call('TIME')[1], 'LIMIT', 0, 1000)
for i = #ended, 1, -1 do redis.call('LPUSH', pending, ended[i]) end
if #ended > 0 then redis.call('ZREM', leases, unpack(ended)) end
return #ended
