"""The worker's connections (one set per process) and its unit of work."""

from collections.abc import Iterator
from contextlib import contextmanager

import redis
from sqlalchemy import Connection, Engine, create_engine

from schema.settings import get_settings

_engine: Engine | None = None
_redis: redis.Redis | None = None


def engine() -> Engine:
    global _engine
    if _engine is None:
        _engine = create_engine(get_settings().database_url, pool_size=2, max_overflow=2, pool_pre_ping=True)
    return _engine


def batches() -> redis.Redis:
    """Redis, where the shim stores each batch of operations that a message names."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(get_settings().redis_url, socket_timeout=30)
    return _redis


def reset() -> None:
    """Forget connections inherited from a parent process: a forked child must not share its sockets."""
    global _engine, _redis
    if _engine is not None:
        _engine.dispose(close=False)
    _engine = None
    _redis = None


@contextmanager
def unit_of_work() -> Iterator[Connection]:
    """One transaction: committed when the block ends, rolled back if it raises. The only commit."""
    with engine().begin() as conn:
        yield conn
