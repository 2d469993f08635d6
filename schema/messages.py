"""What the shim puts on the queue and the worker applies.

The shim stores a batch of operations, a JSON list, under a Redis key (`batch_key`), and enqueues one Celery
task, `ops.apply`, whose only argument is that key. Each operation has its own id, claimed by the worker in
the same transaction as its effect, so a message delivered twice changes nothing. The shape is plain JSON
(TypedDicts, not models) because the worker handles a million of these per minute.
"""

from typing import Any, Literal, NotRequired, TypedDict

APPLY_TASK = "ops.apply"
BATCH_KEY_PREFIX = "ingest:batch:"


def batch_key(name: str) -> str:
    return BATCH_KEY_PREFIX + name

JsonObject = dict[str, Any]


class ResultJob(TypedDict):
    key: str
    name: str
    status: int  # a status id: the shim has already mapped the client's string
    folder: NotRequired[str]
    elapsed: NotRequired[int]
    file: NotRequired[str]
    line: NotRequired[int]
    assertions: NotRequired[int]
    fields: NotRequired[list[JsonObject]]
    artifacts: NotRequired[list[JsonObject]]


class OpBase(TypedDict):
    id: str  # uuid given at the shim when the request was accepted
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
    elapsed_observed: NotRequired[int]
    elapsed_computed: NotRequired[int]
    fields: NotRequired[list[JsonObject]]
    artifacts: NotRequired[list[JsonObject]]
    tests: NotRequired[list[ResultJob]]


class ThreadCompleteOp(OpBase):
    kind: Literal["thread.complete"]
    thread_id: int
    elapsed_observed: NotRequired[int]
    elapsed_computed: NotRequired[int]
    # Appends to this thread accepted before this complete.
    expected: int


Op = RunAppendOp | RunCompleteOp | ThreadAppendOp | ThreadCompleteOp
