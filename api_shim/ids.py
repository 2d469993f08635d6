"""Ids for new runs, threads and sources, drawn from PostgreSQL's sequences ahead of need.

A create is answered with its id at once, without a round trip to PostgreSQL (which may be down: a failover,
a restart): each shim process holds a block of ids it took from the table's own sequence, and takes the next
block in the background when half of it is gone. A sequence never hands out a value twice, whatever happens
after (a shim killed with ids unused leaves a gap, nothing more), and ids do not depend on Redis at all.
"""

import asyncio
import logging
from collections import deque

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api_shim.errors import unavailable

log = logging.getLogger(__name__)


class IdBlocks:
    def __init__(self, engine: AsyncEngine, table: str, block: int, retry_after: int) -> None:
        self.engine = engine
        self.table = table
        self.block = block
        self.retry_after = retry_after
        self._ids: deque[int] = deque()
        self._refill: asyncio.Task[None] | None = None

    async def take(self) -> int:
        """The next id; 503 if none is left and PostgreSQL cannot give more."""
        if not self._ids:
            try:
                await self._fill()
            except Exception as exc:
                log.warning("no %s ids left and none can be drawn: %s", self.table, type(exc).__name__)
                raise unavailable(self.retry_after, "The database") from exc
        if len(self._ids) < self.block // 2 and self._refill is None:
            self._refill = asyncio.create_task(self._fill_in_background())
        return self._ids.popleft()

    async def start(self) -> None:
        """Draw a first block, if the database can be reached (else the first create will try again)."""
        try:
            await self._fill()
        except Exception as exc:
            log.warning("could not draw %s ids at start: %s", self.table, type(exc).__name__)

    async def _fill_in_background(self) -> None:
        try:
            await self._fill()
        except Exception as exc:  # the block left serves meanwhile; the next take tries again
            log.warning("could not draw %s ids: %s", self.table, type(exc).__name__)
        finally:
            self._refill = None

    async def _fill(self) -> None:
        async with self.engine.connect() as conn:
            ids = (await conn.execute(text(
                "SELECT nextval(pg_get_serial_sequence(:table, 'id')) FROM generate_series(1, :n)"),
                {"table": self.table, "n": self.block})).scalars().all()
        self._ids.extend(sorted(ids))
