-- What every script that enqueues shares. `batch` names the keys and values of the batch being stored:
--   queue (the Celery list), pending (the queue's list of stored batches), key (the batch's own key),
--   stats (the installation's counts), message (the Celery message naming the batch),
--   max_messages, max_bytes (the high-water marks; 0 for none).

-- Whether the queue is over a high-water mark: appends and new threads are refused then ('busy', a 429), so
-- that a stalled fleet of workers cannot make Redis grow without bound. Completes are never refused: they are
-- small, and refusing one would fail a CI job that has already delivered all its results.
local function full(batch)
  return (batch.max_messages > 0 and redis.call('LLEN', batch.queue) >= batch.max_messages)
      or (batch.max_bytes > 0 and tonumber(redis.call('HGET', batch.stats, 'queued_bytes') or '0') >= batch.max_bytes)
end

-- A batch is enqueued once. redis-py sends a command again when its connection fails, even if Redis had run
-- it: a script that finds its batch marked sent answers 'ok' again, instead of counting the batch's
-- operations twice (a completion barrier never met) or refusing what it enqueued before.
local SENT_TTL = 300
local function sent_key(batch) return 'ingest:sent:' .. string.match(batch.key, '([^:]+)$') end
local function sent(batch) return redis.call('EXISTS', sent_key(batch)) == 1 end

-- Count what the stored batch costs, push the Celery message naming it, and note it in the pending list,
-- where a worker applying one batch finds others to apply in the same transaction.
local function push(batch)
  redis.call('HINCRBY', batch.stats, 'queued_bytes', accounted(redis.call('STRLEN', batch.key)))
  redis.call('LPUSH', batch.queue, batch.message)
  redis.call('RPUSH', batch.pending, batch.key)
  redis.call('SET', sent_key(batch), '1', 'EX', SENT_TTL)
end

-- Store the batch and push it.
local function enqueue(batch, payload)
  redis.call('SET', batch.key, payload)
  push(batch)
end

-- The resources a run or thread would hold with `add` ("fields:links:artifacts:bytes") on top of `held` (the
-- counts this script already gave it, or nil for its hash's): the new counts, or nil and the cap it passes.
local RESOURCES = {'fields', 'links', 'artifacts', 'bytes'}
local function numbers(text)
  local out = {}
  for n in string.gmatch(text, '%d+') do out[#out + 1] = tonumber(n) end
  return out
end
local function grow(hash, held, add, caps)
  local adds, limits, now = numbers(add), numbers(caps), {}
  for i = 1, 4 do
    local base = held and held[i] or tonumber(redis.call('HGET', hash, RESOURCES[i]) or '0')
    now[i] = base + adds[i]
    if adds[i] > 0 and now[i] > limits[i] then return nil, RESOURCES[i] end
  end
  return now
end
local function keep(hash, now)
  redis.call('HSET', hash, 'fields', now[1], 'links', now[2], 'artifacts', now[3], 'bytes', now[4])
end

-- Idempotency keys: `idem` is "" (none) or "<redis key> <digest of the request>". What was remembered for the
-- key: nil (nothing), 'conflict' (another request used it), or 'again:<answer>' (this one, answered so).
local function recalled(idem)
  if idem == '' then return nil end
  local key, digest = string.match(idem, '^(%S+) (%S+)$')
  local stored = redis.call('GET', key)
  if not stored then return nil end
  local stored_digest, answer = string.match(stored, '^(%S+) ?(.*)$')
  if stored_digest ~= digest then return 'conflict' end
  return 'again:' .. answer
end
local function remember(idem, answer, ttl)
  if idem == '' then return end
  local key, digest = string.match(idem, '^(%S+) (%S+)$')
  redis.call('SET', key, digest .. ' ' .. answer, 'EX', ttl)
end
