"""The worker's database engine and its unit of work."""

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine

from schema.settings import get_settings

_engine: Engine | None = None


def engine() -> Engine:
    global _engine
    if _engine is None:
        _engine = create_engine(get_settings().database_url, pool_size=2, max_overflow=2, pool_pre_ping=True)
    return _engine


def reset_engine() -> None:
    global _engine
    if _engine is not None:
        _engine.dispose(close=False)
    _engine = None


@contextmanager
def unit_of_work() -> Iterator[Connection]:
    """One transaction: committed when the block ends, rolled back if it raises. The only commit."""
    with engine().begin() as conn:
        yield conn
