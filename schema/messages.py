"""What the shim puts on the queue and the worker applies.

The shim stores a batch of operations, a JSON list, under a Redis key (`batch_key`), and enqueues one Celery
task, `ops.apply`, whose only argument is that key; it also notes the key in the queue's pending list, from
which a worker applying one batch takes others to apply in the same transaction. A batch is deleted once its
operations are committed, so a message whose batch is gone has nothing left to do. A message is only a
reminder: one can be lost when Redis crashes, and the pending list, the leases on what workers took from it and
the sweeper (`worker/sweeper.py`) make sure each stored batch is applied all the same.

Each operation has its own id, claimed by the worker in the same transaction as its effect, so an operation
delivered twice changes nothing. The shape is plain JSON (TypedDicts, not models) because the worker handles
a million of these per minute.
"""

from typing import Any, Literal, NotRequired, TypedDict

APPLY_TASK = "ops.apply"
FOLD_TASK = "cases.fold"
DELIVER_TASK = "webhooks.deliver"
BATCH_KEY_PREFIX = "ingest:batch:"


def batch_key(name: str) -> str:
    return BATCH_KEY_PREFIX + name


# How long a run's or thread's Redis state lives unused: an open one is refreshed on every use, so it only
# expires when nothing can be in flight for it; a closed one only has to refuse late requests for a while.
# What a stored batch costs Redis, from above, by its payload's length: the payload with the allocator's
# rounding (up to a quarter more), its Celery message (about 900 bytes), its key and its pending-list entry.
# Measured on Redis 7 (jemalloc): a 264-byte batch takes 1,404 bytes, a 6.5 KB one 8.2 KB, a 1.3 MB one
# 1.26 MB. The shim counts batches in with it and the worker counts them out with it, so the high-water
# mark in bytes bounds what Redis really holds (deploy/README.md).
ACCOUNTED_LUA = "local function accounted(n) return n + math.floor(n / 4) + 1536 end\n"


def accounted(payload_bytes: int) -> int:
    """ACCOUNTED_LUA, for Python."""
    return payload_bytes + payload_bytes // 4 + 1536


OPEN_TTL_SECONDS = 30 * 24 * 3600
CLOSED_TTL_SECONDS = 24 * 3600


def run_key(run_id: int) -> str:
    """The Redis hash of a run's state on the hot path (see `api_shim/queue.py`)."""
    return f"ingest:run:{run_id}"


def thread_key(thread_id: int) -> str:
    return f"ingest:thread:{thread_id}"


def unwritten_runs_key(project_id: int) -> str:
    """The project's runs a shim created that no worker has written yet."""
    return f"ingest:unwritten:{project_id}"


def pending_key(queue: str) -> str:
    """The list of batches enqueued on `queue`, oldest first: a worker applying one takes others from it."""
    return f"ingest:pending:{queue}"


def leased_key(queue: str) -> str:
    """The sorted set of batches a worker took from the pending list, scored by when its lease ends: a batch
    whose transaction never committed goes back to the pending list then (see `worker/tasks.py`)."""
    return f"ingest:leased:{queue}"

JsonObject = dict[str, Any]


# A result travels as a row in this order, ready for COPY once the worker puts the run and thread ids before
# it and the accept time after it; `fields` and `artifacts` are JSON text (or null).
RESULT_FIELDS = ("status_id", "key", "name", "folder", "elapsed", "file", "line", "assertions", "fields",
                 "artifacts")
ResultRow = list[Any]


class OpBase(TypedDict):
    id: str  # uuid given at the shim when the request was accepted
    request_id: NotRequired[str]  # the HTTP request's, for following it through the logs
    run_id: int
    user_id: int
    at: str  # ISO 8601 UTC time the shim accepted the request


class RunAppendOp(OpBase):
    kind: Literal["run.append"]
    fields: NotRequired[list[JsonObject]]
    links: NotRequired[list[JsonObject]]
    artifacts: NotRequired[list[JsonObject]]


class RunCompleteOp(OpBase):
    kind: Literal["run.complete"]
    measure_elapsed: bool
    # Operations on the run (run appends, thread appends, thread completes) accepted before this complete.
    expected: int


class ThreadAppendOp(OpBase):
    kind: Literal["thread.append"]
    thread_id: int
    # The request body as the shim accepted it (schema.requests.ThreadAppend), as it came. The shim queues a
    # thread append as the pair [head, body], the head being the rest of this; the worker decodes the body with
    # the same declaration and makes its tests rows (worker/apply.py `decode_batch`).
    body: NotRequired[Any]
    # What an earlier version sent instead of the body: the tests as rows, with their counts by status id
    # ([status id, count] pairs) and the sum of their elapsed. Still applied, from queues and dead letters.
    elapsed_observed: NotRequired[int]
    elapsed_computed: NotRequired[int]
    fields: NotRequired[list[JsonObject]]
    artifacts: NotRequired[list[JsonObject]]
    results: NotRequired[list[ResultRow]]
    counts: NotRequired[list[list[int]]]
    results_elapsed: NotRequired[int]


class ThreadCompleteOp(OpBase):
    kind: Literal["thread.complete"]
    thread_id: int
    elapsed_observed: NotRequired[int]
    elapsed_computed: NotRequired[int]
    # Appends to this thread accepted before this complete.
    expected: int


class RunCreateOp(OpBase):
    """A run the shim created (its id drawn ahead: api_shim/ids.py); the worker writes its row."""

    kind: Literal["run.create"]
    project_id: int
    source_id: int  # drawn by the shim for a new source; the one the database holds for its name wins
    source: str
    name: str
    config_id: int | None
    milestone_id: int | None
    tags: list[str]
    fields: list[JsonObject]
    links: list[JsonObject]
    artifacts: list[JsonObject]


class ThreadCreateOp(OpBase):
    """A thread the shim created; it counts towards its run's completion barrier like the thread's appends."""

    kind: Literal["thread.create"]
    thread_id: int
    name: str | None
    elapsed_observed: int | None
    elapsed_computed: int | None
    fields: list[JsonObject]
    artifacts: list[JsonObject]


Op = RunCreateOp | ThreadCreateOp | RunAppendOp | RunCompleteOp | ThreadAppendOp | ThreadCompleteOp
