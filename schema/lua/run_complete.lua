-- A run's complete, which records how many operations on the run were accepted before it: 'ok', 'done' (it
-- was completed already), 'missing' (Redis lost the run's state), 'again:', 'conflict'.
--
-- KEYS: the batch's four keys, then the run's state hash.
-- ARGV: the batch's message and marks, then the payload before and after the count, closed ttl, idempotency
--       ttl, idempotency key.
local batch = {queue = KEYS[1], pending = KEYS[2], key = KEYS[3], stats = KEYS[4], message = ARGV[1],
               max_messages = tonumber(ARGV[2]), max_bytes = tonumber(ARGV[3])}
if sent(batch) then return 'ok' end
local run = KEYS[5]
local before, after, closed_ttl, idem_ttl, idem = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local known = recalled(idem)
if known then return known end
local closed = redis.call('HGET', run, 'closed')
if not closed then return 'missing' end
if closed == '1' then return 'done' end
redis.call('HSET', run, 'closed', '1')
redis.call('EXPIRE', run, closed_ttl)
enqueue(batch, before .. redis.call('HGET', run, 'ops') .. after)
remember(idem, '', idem_ttl)
return 'ok'
