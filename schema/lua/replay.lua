-- A payload stored and enqueued as it is, never refused: `ingest dlq replay` queues operations again that
-- were counted when first accepted, and a worker gives back operations whose run or thread is not written yet.
--
-- KEYS: the batch's four keys. ARGV: the batch's message and marks, then the payload.
local batch = {queue = KEYS[1], pending = KEYS[2], key = KEYS[3], stats = KEYS[4], message = ARGV[1],
               max_messages = tonumber(ARGV[2]), max_bytes = tonumber(ARGV[3])}
if sent(batch) then return 'ok' end
enqueue(batch, ARGV[4])
return 'ok'
