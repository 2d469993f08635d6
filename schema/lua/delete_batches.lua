-- Applied batches deleted, their leases ended, and what the shim counted for each taken off the queue's bytes.
-- Only the worker that deletes a batch discounts it.
--
-- KEYS: stats, leases, then the batches. ARGV: the batches' payload sizes, in the same order.
local stats, leases = KEYS[1], KEYS[2]
for i = 3, #KEYS do
  local batch, size = KEYS[i], tonumber(ARGV[i - 2])
  if redis.call('DEL', batch) == 1 then redis.call('HINCRBY', stats, 'queued_bytes', -accounted(size)) end
  redis.call('ZREM', leases, batch)
end
