"""Putting operations on the Celery queue, atomically with the completion-barrier bookkeeping.

A batch of operations is stored under its own Redis key, and a small Celery message (protocol 2, JSON) that
names the key is pushed to the list the workers consume (the claim-check pattern: Celery and kombu copy,
re-encode and pickle each message several times, which for a megabyte of results costs more than applying
them). Lua scripts do both, so that checking a thread is still open, counting the append and enqueueing it
are one atomic step: no append can slip in between a complete and the count the complete records.

Per run and per thread a Redis hash keeps the state the hot path needs:
  run:    project, closed ("0"/"1"), ops (operations accepted on the run, its threads' included),
          fields, links, artifacts, bytes (the resources accepted on the run itself, and their JSON bytes)
  thread: run, project, closed, appends (appends accepted), fields, artifacts, bytes
A missing hash is rebuilt from PostgreSQL (see `state.py`); keys of open objects are refreshed on every
use, so a key only expires once nothing can be in flight for it.
"""

import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, TypedDict

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from schema.messages import (
    ACCOUNTED_LUA,
    APPLY_TASK,
    CLOSED_TTL_SECONDS,
    OPEN_TTL_SECONDS,
    batch_key,
    pending_key,
    run_key,
    thread_key,
)
from schema.requests import OBJECT_BYTES_MAX, OBJECT_ITEMS_MAX
from schema.status import STATS_KEY

# The caps on what a run and a thread hold over all their appends (schema.requests), in the scripts' form
# "fields:links:artifacts:bytes". Threads carry no links.
RUN_CAPS = f"{OBJECT_ITEMS_MAX}:{OBJECT_ITEMS_MAX}:{OBJECT_ITEMS_MAX}:{OBJECT_BYTES_MAX}"
THREAD_CAPS = f"{OBJECT_ITEMS_MAX}:0:{OBJECT_ITEMS_MAX}:{OBJECT_BYTES_MAX}"
NO_RESOURCES = "0:0:0:0"

_ORIGIN = f"ingest-shim@{socket.gethostname()}:{os.getpid()}"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


# Every script below starts with this. It stores the batch, counts its bytes, pushes the Celery message naming
# it, and notes the batch in the queue's pending list, where a worker applying one batch finds others to apply
# in the same transaction.
# KEYS[1..4]: queue, pending list, batch, stats. ARGV[1..3]: message, high water (messages), high water (bytes).
# Appends are refused ('busy', a 429) while the queue holds that many messages, or its batches that many bytes,
# so that a stalled fleet of workers cannot make Redis grow without bound. Completes are never refused: they
# are small, and refusing one would fail a CI job that has already delivered all its results.
_PRELUDE = ACCOUNTED_LUA + """
local function full()
  local messages, bytes = tonumber(ARGV[2]), tonumber(ARGV[3])
  return (messages > 0 and redis.call('LLEN', KEYS[1]) >= messages)
      or (bytes > 0 and tonumber(redis.call('HGET', KEYS[4], 'queued_bytes') or '0') >= bytes)
end
-- Resources a run or thread would hold with `add` ("fields:links:artifacts:bytes") on top of `held` (its
-- hash's counts, or what this script already added): the new counts, or nil and the cap it would pass.
-- ARGV[3 + 1] of each script that calls it carries the caps in the same form.
local function grow(hash, held, add, caps)
  local names = {'fields', 'links', 'artifacts', 'bytes'}
  local adds, limits = {}, {}
  for n in string.gmatch(add, '%d+') do adds[#adds + 1] = tonumber(n) end
  for n in string.gmatch(caps, '%d+') do limits[#limits + 1] = tonumber(n) end
  local now = {}
  for i = 1, 4 do
    local base = held and held[i] or tonumber(redis.call('HGET', hash, names[i]) or '0')
    now[i] = base + adds[i]
    if adds[i] > 0 and now[i] > limits[i] then return nil, names[i] end
  end
  return now
end
local function keep(hash, now)
  redis.call('HSET', hash, 'fields', now[1], 'links', now[2], 'artifacts', now[3], 'bytes', now[4])
end
local function enqueue(payload)
  redis.call('SET', KEYS[3], payload)
  redis.call('HINCRBY', KEYS[4], 'queued_bytes', accounted(string.len(payload)))
  redis.call('LPUSH', KEYS[1], ARGV[1])
  redis.call('RPUSH', KEYS[2], KEYS[3])
end
"""

# A batch of thread operations: appends ('a') and completes ('c'), in the order they were accepted.
# KEYS[5..]: a (run, thread) pair per operation.
# ARGV[4..]: open ttl, closed ttl, kinds ("aac..."), results in the appends, caps of a thread's resources,
#            each op's resources ("f:l:a:b," per op, "," for none), then the payload in pieces: the number
#            of appends each complete found accepted before it goes between the pieces.
# Enqueues the batch only if every operation may go; otherwise enqueues nothing and returns a verdict
# per operation: 'ok' (may go), 'missing' (Redis lost the state), 'closed' (an append to a completed thread
# or run), 'done' (a complete of a completed thread or run), 'busy' (an append while the queue is full),
# 'full:<what>' (an append that would take its thread past the cap on its fields, artifacts or bytes).
_THREADS = _PRELUDE + """
local kinds = ARGV[6]
local n = #kinds
local busy = string.find(kinds, 'a', 1, true) and full()
local verdicts, blocked, closing = {}, false, {}
local resources, grown = {}, {}
for part in string.gmatch(ARGV[9], '([^,]*),') do resources[#resources + 1] = part end
for i = 1, n do
  local run, thread = KEYS[2 * i + 3], KEYS[2 * i + 4]
  local run_closed = redis.call('HGET', run, 'closed')
  local thread_closed = redis.call('HGET', thread, 'closed')
  local verdict = 'ok'
  if not run_closed or not thread_closed then
    verdict = 'missing'
  elseif run_closed == '1' or thread_closed == '1' or closing[thread] then
    verdict = string.sub(kinds, i, i) == 'a' and 'closed' or 'done'
  elseif string.sub(kinds, i, i) == 'a' then
    if busy then
      verdict = 'busy'
    elseif resources[i] ~= '' then
      local now, over = grow(thread, grown[thread], resources[i], ARGV[8])
      if now then grown[thread] = now else verdict = 'full:' .. over end
    end
  else
    closing[thread] = true
  end
  if verdict ~= 'ok' then blocked = true end
  verdicts[i] = verdict
end
if blocked then return verdicts end
for thread, now in pairs(grown) do keep(thread, now) end
local payload, piece, appends = {ARGV[10]}, 11, 0
for i = 1, n do
  local run, thread = KEYS[2 * i + 3], KEYS[2 * i + 4]
  redis.call('HINCRBY', run, 'ops', 1)
  redis.call('EXPIRE', run, ARGV[4])
  if string.sub(kinds, i, i) == 'a' then
    redis.call('HINCRBY', thread, 'appends', 1)
    redis.call('EXPIRE', thread, ARGV[4])
    appends = appends + 1
  else
    redis.call('HSET', thread, 'closed', '1')
    redis.call('EXPIRE', thread, ARGV[5])
    payload[#payload + 1] = redis.call('HGET', thread, 'appends')
    payload[#payload + 1] = ARGV[piece]
    piece = piece + 1
  end
end
enqueue(table.concat(payload))
if appends > 0 then
  redis.call('HINCRBY', KEYS[4], 'appends_accepted', appends)
  redis.call('HINCRBY', KEYS[4], 'results_accepted', ARGV[7])
end
return 'ok'
"""

# KEYS[5]: run. ARGV[4..]: payload, open ttl, caps of a run's resources, this append's resources ("f:l:a:b").
_RUN_APPEND = _PRELUDE + """
if full() then return 'busy' end
local closed = redis.call('HGET', KEYS[5], 'closed')
if not closed then return 'missing' end
if closed == '1' then return 'closed' end
local now, over = grow(KEYS[5], nil, ARGV[7], ARGV[6])
if not now then return 'full:' .. over end
keep(KEYS[5], now)
redis.call('HINCRBY', KEYS[5], 'ops', 1)
redis.call('EXPIRE', KEYS[5], ARGV[5])
enqueue(ARGV[4])
return 'ok'
"""

# KEYS[5]: run. ARGV[4..]: payload before and after the count, closed ttl.
# The complete records how many operations on the run were accepted before it.
_RUN_COMPLETE = _PRELUDE + """
local closed = redis.call('HGET', KEYS[5], 'closed')
if not closed then return 'missing' end
if closed == '1' then return 'done' end
redis.call('HSET', KEYS[5], 'closed', '1')
redis.call('EXPIRE', KEYS[5], ARGV[6])
enqueue(ARGV[4] .. redis.call('HGET', KEYS[5], 'ops') .. ARGV[5])
return 'ok'
"""

# ARGV[4]: a payload stored and enqueued as it is, never refused: `ingest dlq replay` re-queues operations that
# were counted when first accepted.
ENQUEUE = _PRELUDE + """
enqueue(ARGV[4])
return 'ok'
"""

# KEYS: key. ARGV: ttl, then field/value pairs. Creates the hash only if it is missing, so a rebuild
# from the database never overwrites counts that the scripts above are keeping.
_FILL = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class ThreadOp:
    """A thread append or complete, serialised, waiting to be batched."""

    kind: str  # "a" (append) or "c" (complete: Lua adds its `expected`, the count it finds accepted before it)
    run_id: int
    thread_id: int
    op: bytes
    results: int = 0
    resources: str = ""  # "fields:links:artifacts:bytes" an append adds to its thread (resources_of)


def resources_of(body: dict[str, Any]) -> tuple[str, int]:
    """What an append or create adds to its run's or thread's resources, in the form the scripts take
    ("fields:links:artifacts:bytes", "" for nothing), and its bytes."""
    parts = [body.get(name) or () for name in ("fields", "links", "artifacts")]
    if not any(parts):
        return "", 0
    size = sum(len(orjson.dumps(part)) for part in parts if part)
    return ":".join(str(len(part)) for part in parts) + f":{size}", size


class Held(TypedDict):
    fields: int
    links: int
    artifacts: int
    bytes: int


def held(resources: str) -> Held:
    """The counts of a new run's or thread's state hash for the resources it was created with."""
    fields, links, artifacts, size = (int(n) for n in (resources or NO_RESOURCES).split(":"))
    return Held(fields=fields, links=links, artifacts=artifacts, bytes=size)


def celery_message(queue: str, key: str) -> bytes:
    """A Celery protocol-2 message for the `ops.apply` task on the batch stored at `key`, as kombu's Redis
    transport stores it."""
    task_id = str(uuid.uuid4())
    return orjson.dumps({
        "body": orjson.dumps([[key], {}, _EMBED]).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": APPLY_TASK, "id": task_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
            "root_id": task_id, "parent_id": None, "argsrepr": repr([key]), "kwargsrepr": "{}",
            "origin": _ORIGIN, "ignore_result": True,
            # Read back by the status and metrics (the age of the oldest waiting message).
            "ingest_enqueued_at": time.time(),
        },
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0, "body_encoding": "utf-8", "delivery_tag": str(uuid.uuid4()),
        },
    })


def new_batch(queue: str, high_water: int = 0, high_water_bytes: int = 0) -> tuple[list[str], list[Any]]:
    """A new batch's KEYS and ARGV prefixes for the scripts above (see _PRELUDE)."""
    key = batch_key(uuid.uuid4().hex)
    return [queue, pending_key(queue), key, STATS_KEY], [celery_message(queue, key), high_water, high_water_bytes]


def around_expected(op: bytes) -> tuple[bytes, bytes]:
    """A complete's JSON object in two pieces, between which Lua writes the count it records as `expected`.

    The count goes last, outside anything the client sent, so no request id or name can ever be taken for
    the place where it goes."""
    if not op.endswith(b"}"):
        raise ValueError("a complete's operation must be one JSON object")
    return op[:-1] + b',"expected":', b"}"


class Queue:
    def __init__(self, redis: Redis, queue: str, high_water: int, high_water_bytes: int = 0) -> None:
        self.redis = redis
        self.queue = queue
        self.high_water = high_water
        self.high_water_bytes = high_water_bytes
        self._threads = redis.register_script(_THREADS)
        self._run_append = redis.register_script(_RUN_APPEND)
        self._run_complete = redis.register_script(_RUN_COMPLETE)
        self._fill = redis.register_script(_FILL)

    def high_water_reading(self, pipe: Pipeline) -> None:
        """Queue on `pipe` what `over_high_water` needs: the waiting messages and the bytes counted."""
        pipe.llen(self.queue)
        pipe.hget(STATS_KEY, "queued_bytes")

    def over_high_water(self, waiting: int, queued_bytes: bytes | None) -> bool:
        """The scripts' full(), for what the shim refuses outside them (thread creates)."""
        return ((self.high_water > 0 and waiting >= self.high_water)
                or (self.high_water_bytes > 0 and int(queued_bytes or 0) >= self.high_water_bytes))

    def _batch(self) -> tuple[list[str], list[Any]]:
        return new_batch(self.queue, self.high_water, self.high_water_bytes)

    async def thread_ops(self, ops: list[ThreadOp]) -> list[str] | str:
        """Enqueue thread appends and completes as one batch: 'ok', or (nothing enqueued) a verdict per op."""
        keys, args = self._batch()
        for op in ops:
            keys += [run_key(op.run_id), thread_key(op.thread_id)]
        # The payload is the JSON list of the ops, cut where each complete's count goes.
        pieces = []
        current = [b"["]
        for op in ops:
            if op.kind == "c":
                before, after = around_expected(op.op)
                current.append(before)
                pieces.append(b"".join(current))
                current = [after]
            else:
                current.append(op.op)
            current.append(b",")
        current[-1] = b"]"
        pieces.append(b"".join(current))
        kinds = "".join(op.kind for op in ops)
        results = sum(op.results for op in ops)
        resources = "".join(op.resources + "," for op in ops)
        args += [OPEN_TTL_SECONDS, CLOSED_TTL_SECONDS, kinds, results, THREAD_CAPS, resources, *pieces]
        verdict = await self._threads(keys=keys, args=args)
        if isinstance(verdict, bytes):
            return verdict.decode()
        return [v.decode() for v in verdict]

    async def run_append(self, op: Any, resources: str) -> str:
        keys, args = self._batch()
        verdict = await self._run_append(keys=[*keys, run_key(op["run_id"])],
                                         args=[*args, orjson.dumps([op]), OPEN_TTL_SECONDS, RUN_CAPS,
                                               resources or NO_RESOURCES])
        return str(verdict.decode())

    async def run_complete(self, op: Any) -> str:
        keys, args = self._batch()
        before, after = around_expected(orjson.dumps(op))
        before, after = b"[" + before, after + b"]"
        verdict = await self._run_complete(keys=[*keys, run_key(op["run_id"])],
                                           args=[*args, before, after, CLOSED_TTL_SECONDS])
        return str(verdict.decode())

    async def fill(self, key: str, closed: bool, client: Pipeline | None = None, **fields: int) -> None:
        """Create a run's or thread's state hash, unless it exists (then its counts are the truth)."""
        args: list[Any] = [CLOSED_TTL_SECONDS if closed else OPEN_TTL_SECONDS, "closed", "1" if closed else "0"]
        for name, value in fields.items():
            args += [name, value]
        await self._fill(keys=[key], args=args, client=client)

    async def thread_ops_with_retry(self, ops: list[ThreadOp]) -> list[str]:
        """A verdict per op. Ops of a refused batch that may go are pushed again at once, on their own: a
        complete is never held back by appends that arrived behind it while the queue was full."""
        verdicts = [""] * len(ops)
        todo = list(range(len(ops)))
        while todo:
            verdict = await self.thread_ops([ops[i] for i in todo])
            if isinstance(verdict, str):
                for i in todo:
                    verdicts[i] = verdict
                break
            retry = []
            for i, one in zip(todo, verdict, strict=True):
                if one == "ok":
                    retry.append(i)
                else:
                    verdicts[i] = one
            todo = retry
        return verdicts
