-- A batch of thread operations, in the order they were accepted: new threads ('n'), appends ('a') and
-- completes ('c'). Enqueued only if every one may go; otherwise nothing is, and the answer is a verdict per
-- operation: 'ok' (may go), 'missing' (Redis lost a run's or thread's state: rebuild it and retry),
-- 'closed' (an append to, or a new thread in, a completed thread or run), 'done' (a complete of a completed
-- one), 'busy' (an append or new thread while the queue is full), 'full:<what>' (an append past its thread's
-- cap), 'again:<answer>' or 'conflict' (its idempotency key was used before), 'wait' (its key is used by
-- another operation of this batch: retry it once this one is settled).
--
-- KEYS: the batch's four keys, then a (run, thread) pair per operation.
-- ARGV: the batch's message and marks, then open ttl, closed ttl, idempotency ttl, the kinds ("naac..."),
--       results in the appends, a thread's caps, then per operation its resources and its idempotency key
--       (each "...," in one string), then the payload's head (its new threads and appends, all but the
--       completes) or '' (see below), then the rest of the payload in pieces: each complete's count goes
--       between two.
-- A big head comes not here but to the batch's key, with a TTL, by a plain SET just before (passing a
-- megabyte to a script costs Redis milliseconds): this deletes it if nothing is enqueued, and keeps it if
-- the batch is.
local batch = {queue = KEYS[1], pending = KEYS[2], key = KEYS[3], stats = KEYS[4], message = ARGV[1],
               max_messages = tonumber(ARGV[2]), max_bytes = tonumber(ARGV[3])}
if sent(batch) then return 'ok' end
local open_ttl, closed_ttl, idem_ttl = ARGV[4], ARGV[5], ARGV[6]
local kinds, results, caps = ARGV[7], ARGV[8], ARGV[9]
local resources, idems = {}, {}
for part in string.gmatch(ARGV[10], '([^,]*),') do resources[#resources + 1] = part end
for part in string.gmatch(ARGV[11], '([^,]*),') do idems[#idems + 1] = part end
local head, first_piece = ARGV[12], 13
local function run_of(i) return KEYS[2 * i + 3] end
local function thread_of(i) return KEYS[2 * i + 4] end

local n = #kinds
local busy = (string.find(kinds, 'a', 1, true) or string.find(kinds, 'n', 1, true)) and full(batch)
local verdicts, blocked = {}, false
local state, grown, keys_seen = {}, {}, {}  -- what this batch has done to a thread so far, in Lua only
for i = 1, n do
  local kind, run, thread = string.sub(kinds, i, i), run_of(i), thread_of(i)
  local run_closed = redis.call('HGET', run, 'closed')
  local thread_closed = state[thread] or redis.call('HGET', thread, 'closed')
  local verdict = recalled(idems[i])
  local idem_key = string.match(idems[i], '^(%S+)')
  if verdict == nil and idem_key and keys_seen[idem_key] then verdict = 'wait' end
  if verdict ~= nil then
    -- settled by its idempotency key
  elseif kind == 'n' then
    if not run_closed then
      verdict = 'missing'
    elseif run_closed == '1' then
      verdict = 'closed'
    elseif thread_closed then
      verdict = 'exists'  -- an id handed out twice: never, but never overwrite a thread either
    elseif busy then
      verdict = 'busy'
    else
      local now, over = grow(thread, {0, 0, 0, 0}, resources[i] ~= '' and resources[i] or '0:0:0:0', caps)
      if now then grown[thread], state[thread] = now, '0' else verdict = 'full:' .. over end
    end
  elseif not run_closed or not thread_closed then
    verdict = 'missing'
  elseif run_closed == '1' or thread_closed == '1' then
    verdict = kind == 'a' and 'closed' or 'done'
  elseif kind == 'a' then
    if busy then
      verdict = 'busy'
    elseif resources[i] ~= '' then
      local now, over = grow(thread, grown[thread], resources[i], caps)
      if now then grown[thread] = now else verdict = 'full:' .. over end
    end
  else
    state[thread] = '1'
  end
  if idem_key then keys_seen[idem_key] = true end
  if verdict == nil then verdict = 'ok' end
  if verdict ~= 'ok' then blocked = true end
  verdicts[i] = verdict
end
if blocked then
  if head == '' and redis.call('PTTL', batch.key) > 0 then redis.call('DEL', batch.key) end
  return verdicts
end
-- (Gone only if this runs over a minute after its SET: then nothing is written, and the requests fail.)
if head == '' and redis.call('PERSIST', batch.key) ~= 1 then
  return redis.error_reply('ERR the batch head is not stored')
end

for thread, now in pairs(grown) do keep(thread, now) end
local payload, piece, appends = {ARGV[first_piece]}, first_piece + 1, 0
for i = 1, n do
  local kind, run, thread = string.sub(kinds, i, i), run_of(i), thread_of(i)
  -- Every thread operation counts towards its run's completion barrier.
  redis.call('HINCRBY', run, 'ops', 1)
  redis.call('EXPIRE', run, open_ttl)
  if kind == 'n' then
    redis.call('HSET', thread, 'closed', '0', 'run', string.match(run, '(%d+)$'),
               'project', redis.call('HGET', run, 'project'), 'appends', '0')
    redis.call('EXPIRE', thread, open_ttl)
    remember(idems[i], string.match(thread, '(%d+)$'), idem_ttl)
  elseif kind == 'a' then
    redis.call('HINCRBY', thread, 'appends', 1)
    redis.call('EXPIRE', thread, open_ttl)
    appends = appends + 1
    remember(idems[i], '', idem_ttl)
  else
    redis.call('HSET', thread, 'closed', '1')
    redis.call('EXPIRE', thread, closed_ttl)
    payload[#payload + 1] = redis.call('HGET', thread, 'appends')
    payload[#payload + 1] = ARGV[piece]
    piece = piece + 1
    remember(idems[i], '', idem_ttl)
  end
end
if head ~= '' then redis.call('SET', batch.key, head) end
redis.call('APPEND', batch.key, table.concat(payload))
push(batch)
if appends > 0 then
  redis.call('HINCRBY', batch.stats, 'appends_accepted', appends)
  redis.call('HINCRBY', batch.stats, 'results_accepted', results)
end
return 'ok'
