"""The Redis protocol shims and workers share: its keys, its Lua scripts (`schema/lua/*.lua`), each behind a
wrapper with named arguments, and the Celery message that names a stored batch.

Keys (names in `schema.messages`):
  queue               the Celery list the workers consume; each message names one stored batch
  ingest:batch:*      a batch: the JSON list of its operations, stored until a worker commits it
  ingest:sent:*       the batch of that name was enqueued (kept five minutes): a script call retried after a
                      lost reply answers 'ok' again and enqueues nothing twice
  ingest:pending:Q    the batches enqueued on queue Q, oldest first: a worker applying one takes others
  ingest:leased:Q     batches a worker took from the pending list, by when the lease ends (take_batches.lua)
  ingest:stats        installation-wide counts; `queued_bytes` is what stored batches cost Redis (accounted.lua)
  ingest:run:N        a run's state on the hot path: project, closed ("0"/"1"), ops (operations accepted on
                      the run, its threads' included: the completion barrier), fields, links, artifacts,
                      bytes (its resources, for their caps), pending (the run as a GET shows it until a worker
                      has written its row)
  ingest:thread:N     a thread's: run, project, closed, appends (appends accepted), fields, artifacts, bytes
  ingest:idem:T:K     an idempotency key K of token T: the request's digest and its answer, for a day
  ingest:unwritten:P  runs of project P created but not written by a worker yet (lists wait for them)

A batch is stored under its own key, and a small Celery message (protocol 2, JSON) that names the key is pushed
to the queue (the claim-check pattern: Celery and kombu copy, re-encode and pickle each message several times,
which for a megabyte of results costs more than applying them). The enqueue scripts do both atomically with the
completion-barrier bookkeeping: no append can slip in between a complete and the count the complete records.
"""

import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any, TypedDict

import orjson
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from schema.messages import (
    APPLY_TASK,
    CLOSED_TTL_SECONDS,
    OPEN_TTL_SECONDS,
    batch_key,
    pending_key,
    unwritten_runs_key,
)
from schema.requests import OBJECT_BYTES_MAX, OBJECT_ITEMS_MAX
from schema.status import STATS_KEY

# The caps on what a run and a thread hold over all their appends (schema.requests), in the scripts' form
# "fields:links:artifacts:bytes". Threads carry no links.
RUN_CAPS = f"{OBJECT_ITEMS_MAX}:{OBJECT_ITEMS_MAX}:{OBJECT_ITEMS_MAX}:{OBJECT_BYTES_MAX}"
THREAD_CAPS = f"{OBJECT_ITEMS_MAX}:0:{OBJECT_ITEMS_MAX}:{OBJECT_BYTES_MAX}"
NO_RESOURCES = "0:0:0:0"
IDEMPOTENCY_TTL_SECONDS = 24 * 3600
# A thread batch's payload head over SCRIPT_HEAD_BYTES is stored just before its script runs, and outlives a
# script that never runs (a connection lost in between) by HEAD_TTL_SECONDS. The size is where the pipeline
# this takes costs the shim (30 µs) what the bytes would cost Redis in the script.
SCRIPT_HEAD_BYTES = 32 * 1024
HEAD_TTL_SECONDS = 60

_ORIGIN = f"ingest@{socket.gethostname()}:{os.getpid()}"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@cache
def source(*names: str) -> str:
    """The Lua of these files of `schema/lua`, one after another (a script's helpers first)."""
    return "\n".join((files("schema") / "lua" / f"{name}.lua").read_text() for name in names)


ENQUEUE = ("accounted", "enqueue")  # what every enqueue script starts with


# --- what the scripts carry --------------------------------------------------------------------------------

def celery_message(queue: str, key: str) -> bytes:
    """A Celery protocol-2 message for the `ops.apply` task on the batch stored at `key`, as kombu's Redis
    transport stores it (`tests/test_protocol.py` holds it against kombu's own)."""
    task_id = str(uuid.uuid4())
    return orjson.dumps({
        "body": orjson.dumps([[key], {}, _EMBED]).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": APPLY_TASK, "id": task_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
            "root_id": task_id, "parent_id": None, "argsrepr": repr([key]), "kwargsrepr": "{}",
            "origin": _ORIGIN, "ignore_result": True, "replaced_task_nesting": 0, "stamped_headers": None,
            "stamps": {},
            # Read back by the status and metrics (the age of the oldest waiting message).
            "ingest_enqueued_at": time.time(),
        },
        "properties": {
            "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0, "body_encoding": "utf-8", "delivery_tag": str(uuid.uuid4()),
        },
    })


@dataclass(frozen=True)
class Batch:
    """A batch about to be stored: its own key and the message naming it, with the queue's high-water marks
    (0: none) beyond which appends and new threads are refused."""

    queue: str
    key: str
    message: bytes
    max_messages: int = 0
    max_bytes: int = 0

    @classmethod
    def new(cls, queue: str, max_messages: int = 0, max_bytes: int = 0) -> "Batch":
        key = batch_key(uuid.uuid4().hex)
        return cls(queue, key, celery_message(queue, key), max_messages, max_bytes)

    def keys(self) -> list[str]:
        return [self.queue, pending_key(self.queue), self.key, STATS_KEY]

    def args(self) -> list[Any]:
        return [self.message, self.max_messages, self.max_bytes]


@dataclass(frozen=True)
class ThreadOp:
    """A new thread, a thread append or a thread complete, serialised, waiting to be batched."""

    kind: str  # "n" (new thread), "a" (append) or "c" (complete: its count, `expected`, is added by Lua)
    run_id: int
    thread_id: int
    op: bytes
    results: int = 0
    resources: str = ""  # "fields:links:artifacts:bytes" a new thread or an append adds to the thread
    idem: str = ""  # "<key> <digest>" of an idempotency key (api_shim/idempotency.py), or ""


def around_expected(op: bytes) -> tuple[bytes, bytes]:
    """A complete's JSON object in two pieces, between which Lua writes the count it records as `expected`.

    The count goes last, outside anything the client sent, so no request id or name can ever be taken for
    the place where it goes."""
    if not op.endswith(b"}"):
        raise ValueError("a complete's operation must be one JSON object")
    return op[:-1] + b',"expected":', b"}"


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
    """The counts of a run's or thread's state hash for these resources."""
    fields, links, artifacts, size = (int(n) for n in (resources or NO_RESOURCES).split(":"))
    return Held(fields=fields, links=links, artifacts=artifacts, bytes=size)


def _text(verdict: Any) -> str:
    return verdict.decode() if isinstance(verdict, bytes) else str(verdict)


# --- the shim's scripts (asyncio) --------------------------------------------------------------------------

class ShimScripts:
    """The enqueue scripts, on a shim's client."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._thread_ops = redis.register_script(source(*ENQUEUE, "thread_ops"))
        self._run_create = redis.register_script(source(*ENQUEUE, "run_create"))
        self._run_append = redis.register_script(source(*ENQUEUE, "run_append"))
        self._run_complete = redis.register_script(source(*ENQUEUE, "run_complete"))
        self._fill = redis.register_script(source("fill"))
        self._token_fill = redis.register_script(source("token_fill"))

    async def thread_ops(self, batch: Batch, ops: Sequence[ThreadOp], run_keys: Sequence[str],
                         thread_keys: Sequence[str]) -> str | list[str]:
        """New threads, appends and completes as one batch: 'ok', or (nothing enqueued) a verdict per op
        (thread_ops.lua)."""
        keys = batch.keys()
        for run, thread in zip(run_keys, thread_keys, strict=True):
            keys += [run, thread]
        # The payload is the JSON list of the ops, the completes last, cut where each complete's count goes.
        # (In a batch that is enqueued no append follows its thread's complete: the script refuses that. So
        # putting the completes last changes no count, and the worker applies a batch's ops in any order.)
        # What comes before the completes, the head, is most of it; a big head goes to its key by a plain SET
        # just ahead of the script, since bytes passed to a script cost Redis 1.3 µs a KB (copied into Lua and
        # out again) and a SET next to nothing; a small one goes with the script, sparing the shim a pipeline.
        head = [b"["]
        for op in ops:
            if op.kind != "c":
                head += (op.op, b",")
        if len(head) > 1:
            head.pop()
        pieces = []
        current, joiner = b"", b"," if len(head) > 1 else b""
        for op in ops:
            if op.kind == "c":
                before, after = around_expected(op.op)
                pieces.append(current + joiner + before)
                current, joiner = after, b","
        pieces.append(current + b"]")
        payload_head = b"".join(head)
        stored = len(payload_head) > SCRIPT_HEAD_BYTES
        args = [*batch.args(), OPEN_TTL_SECONDS, CLOSED_TTL_SECONDS, IDEMPOTENCY_TTL_SECONDS,
                "".join(op.kind for op in ops), sum(op.results for op in ops), THREAD_CAPS,
                "".join(op.resources + "," for op in ops), "".join(op.idem + "," for op in ops),
                b"" if stored else payload_head, *pieces]
        if not stored:
            verdict = await self._thread_ops(keys=keys, args=args)
        else:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(batch.key, payload_head, ex=HEAD_TTL_SECONDS, nx=True)  # a retry never cuts a stored batch
            pipe.evalsha(self._thread_ops.sha, len(keys), *keys, *args)
            try:
                verdict = (await pipe.execute())[1]
            except NoScriptError:  # Redis restarted, or its scripts were flushed: the head is stored anyway
                verdict = await self._thread_ops(keys=keys, args=args)
        return [_text(v) for v in verdict] if isinstance(verdict, list) else _text(verdict)

    async def run_create(self, batch: Batch, run_key: str, project_id: int, op: bytes, resources: str,
                         view: bytes, idem: str) -> str:
        """A new run's state and the operation that writes its row (run_create.lua)."""
        return _text(await self._run_create(keys=[*batch.keys(), run_key, unwritten_runs_key(project_id)], args=[
            *batch.args(), b"[" + op + b"]", OPEN_TTL_SECONDS, IDEMPOTENCY_TTL_SECONDS, project_id,
            resources or NO_RESOURCES, view, idem]))

    async def run_append(self, batch: Batch, run_key: str, op: bytes, resources: str, idem: str) -> str:
        return _text(await self._run_append(keys=[*batch.keys(), run_key], args=[
            *batch.args(), b"[" + op + b"]", OPEN_TTL_SECONDS, IDEMPOTENCY_TTL_SECONDS, RUN_CAPS,
            resources or NO_RESOURCES, idem]))

    async def run_complete(self, batch: Batch, run_key: str, op: bytes, idem: str) -> str:
        before, after = around_expected(op)
        return _text(await self._run_complete(keys=[*batch.keys(), run_key], args=[
            *batch.args(), b"[" + before, after + b"]", CLOSED_TTL_SECONDS, IDEMPOTENCY_TTL_SECONDS, idem]))

    async def fill(self, hash_key: str, closed: bool, fields: dict[str, int],
                   client: Pipeline | None = None) -> None:
        """Create a run's or thread's state hash, unless it exists (then its counts are the truth)."""
        args: list[Any] = [CLOSED_TTL_SECONDS if closed else OPEN_TTL_SECONDS, "closed", "1" if closed else "0"]
        for name, value in fields.items():
            args += [name, value]
        await self._fill(keys=[hash_key], args=args, client=client)

    async def token_fill(self, cached_key: str, last_valid_key: str, view: bytes, lifetime_ms: int,
                         last_seconds: int, unknown: bytes, tombstone: bytes) -> None:
        """What a token lookup read (token_fill.lua)."""
        await self._token_fill(keys=[cached_key, last_valid_key],
                               args=[view, lifetime_ms, last_seconds, unknown, tombstone])


# --- the workers' and the administrator's scripts (blocking) -----------------------------------------------

class WorkerScripts:
    """The scripts of workers, the sweeper and `ingest` itself, on a blocking client."""

    def __init__(self, redis: SyncRedis) -> None:
        self._take = redis.register_script(source("take_batches"))
        self._delete = redis.register_script(source("accounted", "delete_batches"))
        self._reclaim = redis.register_script(source("reclaim_leases"))
        self._replay = redis.register_script(source(*ENQUEUE, "replay"))
        self._heartbeat = redis.register_script(source("heartbeat"))

    def take_batches(self, pending: str, leases: str, how_many: int, lease_seconds: int) -> list[str]:
        """Up to `how_many` batches from the pending list, leased for `lease_seconds`."""
        taken = self._take(keys=[pending, leases], args=[how_many, lease_seconds])
        return [_text(key) for key in taken]

    def delete_batches(self, leases: str, batches: Sequence[tuple[str, int]]) -> None:
        """Applied batches (key, payload size) deleted, unleased and discounted."""
        if batches:
            self._delete(keys=[STATS_KEY, leases, *(key for key, _ in batches)],
                         args=[size for _, size in batches])

    def reclaim_leases(self, leases: str, pending: str) -> int:
        """Batches whose lease ended, back in the pending list; how many."""
        return int(self._reclaim(keys=[leases, pending]))

    def replay(self, batch: Batch, payload: bytes) -> None:
        """Store and enqueue operations as they are, never refused (they were counted when accepted)."""
        self._replay(keys=batch.keys(), args=[*batch.args(), payload])

    def heartbeat(self, workers: str, infos: str, worker: str, info: bytes, ttl: int) -> None:
        self._heartbeat(keys=[workers, infos], args=[worker, info, ttl])
