-- What a token lookup read, stored unless a revoke left its tombstone (the revoke landed between the read and
-- this write). A token read as unknown that has a last valid view was revoked, by a revoke whose own write to
-- Redis may have been lost: it gets the tombstone.
--
-- KEYS: the token's cached view, its last valid view. ARGV: the view (or the unknown marker), its lifetime in
-- ms, the last view's lifetime in seconds, the unknown marker, the tombstone.
local cached, last_valid = KEYS[1], KEYS[2]
local view, lifetime_ms, last_seconds, unknown, tombstone = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local last = redis.call('GET', last_valid)
if view == unknown then
  redis.call('SET', cached, view, 'PX', lifetime_ms)
  if last and last ~= tombstone then redis.call('SET', last_valid, tombstone, 'EX', last_seconds) end
elseif last ~= tombstone then
  redis.call('SET', cached, view, 'PX', lifetime_ms)
  redis.call('SET', last_valid, view, 'EX', last_seconds)
end
