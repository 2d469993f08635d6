-- A new run: its state, as the hot path needs it, and the operation that writes its row, in one step, so
-- that a thread create or append right after the answer finds the run open. Answers 'ok', 'exists' (an id
-- handed out twice: never, but never overwrite a run either), 'again:<id>' or 'conflict'.
--
-- KEYS: the batch's four keys, then the run's state hash, the project's runs not written yet (a set).
-- ARGV: the batch's message and marks, then the payload, open ttl, idempotency ttl, project, the run's
--       resources ("f:l:a:b"), the run as a GET shows it until a worker has written it, idempotency key.
local batch = {queue = KEYS[1], pending = KEYS[2], key = KEYS[3], stats = KEYS[4], message = ARGV[1],
               max_messages = tonumber(ARGV[2]), max_bytes = tonumber(ARGV[3])}
if sent(batch) then return 'ok' end
local run, unwritten = KEYS[5], KEYS[6]
local payload, open_ttl, idem_ttl, project, resources, view, idem = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8],
                                                                   ARGV[9], ARGV[10]
local known = recalled(idem)
if known then return known end
if redis.call('EXISTS', run) == 1 then return 'exists' end
local held = numbers(resources)
redis.call('HSET', run, 'closed', '0', 'project', project, 'ops', '0', 'fields', held[1], 'links', held[2],
           'artifacts', held[3], 'bytes', held[4], 'pending', view)
redis.call('EXPIRE', run, open_ttl)
redis.call('SADD', unwritten, string.match(run, '(%d+)$'))
redis.call('EXPIRE', unwritten, open_ttl)
enqueue(batch, payload)
remember(idem, string.match(run, '(%d+)$'), idem_ttl)
return 'ok'
