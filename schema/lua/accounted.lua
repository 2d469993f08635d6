-- What a stored batch costs Redis, from above, by its payload's length: the payload with the allocator's
-- rounding (up to a quarter more), its Celery message (about 900 bytes), its key and its pending-list entry.
-- Measured on Redis 7 (jemalloc): a 264-byte batch takes 1,404 bytes, a 6.5 KB one 8.2 KB, a 1.3 MB one
-- 1.26 MB. The shim counts batches in with it (enqueue) and the worker counts them out with it
-- (delete_batches.lua), so that the high-water mark in bytes bounds what Redis really holds.
local function accounted(n) return n + math.floor(n / 4) + 1536 end
