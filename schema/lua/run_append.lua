-- An append to a run: refused while the queue is full ('busy'), for a completed run ('closed'), past the run's
-- caps ('full:<what>'), for a used idempotency key ('again:', 'conflict'); 'missing' when Redis lost the
-- run's state.
--
-- KEYS: the batch's four keys, then the run's state hash.
-- ARGV: the batch's message and marks, then the payload, open ttl, idempotency ttl, the run's caps, this
--       append's resources ("f:l:a:b"), idempotency key.
local batch = {queue = KEYS[1], pending = KEYS[2], key = KEYS[3], stats = KEYS[4], message = ARGV[1],
               max_messages = tonumber(ARGV[2]), max_bytes = tonumber(ARGV[3])}
if sent(batch) then return 'ok' end
local run = KEYS[5]
local payload, open_ttl, idem_ttl, caps, resources, idem = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local known = recalled(idem)
if known then return known end
if full(batch) then return 'busy' end
local closed = redis.call('HGET', run, 'closed')
if not closed then return 'missing' end
if closed == '1' then return 'closed' end
local now, over = grow(run, nil, resources, caps)
if not now then return 'full:' .. over end
keep(run, now)
redis.call('HINCRBY', run, 'ops', 1)
redis.call('EXPIRE', run, open_ttl)
enqueue(batch, payload)
remember(idem, '', idem_ttl)
return 'ok'
