"""The Celery message the shim builds by hand (schema/protocol.py) against the one Celery and kombu build
for the same task, so that an upgrade of either that changes the format fails here first."""

import base64
from collections.abc import Iterator

import orjson
import pytest
import redis
from support import TEST_REDIS_URL, unique

from schema.messages import APPLY_TASK
from schema.protocol import celery_message, source

# Ours only: read back for the age of the oldest waiting message.
OURS_ONLY = {"ingest_enqueued_at"}
# Different by nature (ids, who sent it, when), or by choice: we never want a result stored.
PER_MESSAGE = {"id", "root_id", "origin", "ignore_result"}


@pytest.fixture
def queue() -> Iterator[str]:
    name = unique("kombu")
    yield name
    with redis.Redis.from_url(TEST_REDIS_URL) as client:
        client.delete(name)


def kombus_message(queue: str, key: str) -> dict[str, object]:
    """What Celery and kombu's Redis transport push for `ops.apply` on `key`."""
    from celery import Celery

    app = Celery(broker=TEST_REDIS_URL)
    app.conf.task_serializer = "json"
    try:
        app.send_task(APPLY_TASK, args=[key], queue=queue)
    finally:
        app.close()
    with redis.Redis.from_url(TEST_REDIS_URL) as client:
        raw = client.lindex(queue, 0)
    assert raw is not None
    message: dict[str, object] = orjson.loads(raw)
    return message


def test_the_hand_built_message_is_the_one_kombu_builds(queue: str) -> None:
    key = "ingest:batch:probe"
    theirs = kombus_message(queue, key)
    ours = orjson.loads(celery_message(queue, key))
    assert set(ours) == set(theirs)
    assert (ours["content-type"], ours["content-encoding"]) == (theirs["content-type"], theirs["content-encoding"])

    their_headers, our_headers = theirs["headers"], ours["headers"]
    assert isinstance(their_headers, dict) and isinstance(our_headers, dict)
    assert set(our_headers) - OURS_ONLY == set(their_headers)
    for name, value in their_headers.items():
        if name not in PER_MESSAGE:
            assert our_headers[name] == value, name
    assert our_headers["root_id"] == our_headers["id"] and their_headers["root_id"] == their_headers["id"]

    their_properties, our_properties = theirs["properties"], ours["properties"]
    assert isinstance(their_properties, dict) and isinstance(our_properties, dict)
    assert set(our_properties) == set(their_properties)
    assert our_properties["delivery_info"] == their_properties["delivery_info"]
    assert our_properties["correlation_id"] == our_headers["id"]
    # kombu base64-encodes the body; ours goes as UTF-8 text, which kombu reads as well (body_encoding says).
    their_body = base64.b64decode(theirs["body"]) if their_properties["body_encoding"] == "base64" else theirs["body"]
    assert orjson.loads(ours["body"]) == orjson.loads(their_body)
    assert our_properties["body_encoding"] == "utf-8"


def test_every_script_is_shipped_and_shares_the_byte_accounting() -> None:
    # The shim counts a batch in by the same function the worker counts it out with.
    accounted = source("accounted")
    assert "local function accounted" in accounted
    for enqueuing in ("thread_ops", "run_create", "run_append", "run_complete", "replay"):
        assert accounted in source("accounted", "enqueue", enqueuing)
    assert accounted in source("accounted", "delete_batches")
    assert "accounted(" in source("enqueue") and "accounted(" in source("delete_batches")
