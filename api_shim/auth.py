"""Bearer tokens: hashed, looked up in a per-process cache, then Redis, then PostgreSQL.

Tokens are stored only as SHA-256 hashes. Lookups go by hash, so the secret is never compared byte by
byte; the final check uses a constant-time comparison anyway.

A revoke or a grant reaches every shim within `auth_cache_seconds` of its commit, however it interleaves with
the lookups, because every view of a token expires `auth_cache_seconds` after the PostgreSQL read it came from
began: the entry a shim writes to Redis after its read lives only what remains of that time (timed on the
monotonic clock from before the read; nothing is written if nothing remains), and a shim keeps an entry it took
from Redis no longer than the entry has left. `ingest admin` deleting the entry only makes a change quicker:
the delete may land between a lookup's read and its write.

A token in use is read again in the background once half its time has gone, so that appends seldom wait on
PostgreSQL. While PostgreSQL is unreachable, a shim falls back on the token's last valid view, kept in Redis
for a day, so that appends are accepted through a database outage. A revoke replaces that view with a
tombstone, which lookups never overwrite: a revoked token does not come back that way either.

Guessing stays cheap: unknown tokens are remembered (in Redis for every shim, and in each process), and a client
address may fail only so often (`FailureLimiter`); beyond that, its tokens that no shim has cached are refused
with 429 without asking PostgreSQL.
"""

import asyncio
import hmac
import math
import time
from contextvars import ContextVar
from dataclasses import dataclass

import orjson
import sqlalchemy.exc
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api_shim.errors import ApiError, forbidden, unauthorized
from api_shim.lru import Lru
from schema.protocol import ShimScripts
from schema.settings import Settings
from schema.tokens import LAST_VALID_SECONDS, REVOKED, auth_key, last_valid_key, token_hash

# The address of the client being answered: observe.Observe sets it for each request, so that every endpoint's
# call to `authenticate` is charged to the right address without handing it the request.
client_address: ContextVar[str | None] = ContextVar("client_address", default=None)

DATABASE_DOWN = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError)
UNKNOWN = b"null"
UNKNOWN_TOKEN = "Unknown or revoked token."

@dataclass(frozen=True)
class Principal:
    user_id: int
    name: str
    projects: frozenset[int]

    def authorize(self, project_id: int) -> None:
        if project_id not in self.projects:
            raise forbidden()

    def dumps(self) -> bytes:
        return orjson.dumps({"user_id": self.user_id, "name": self.name, "projects": sorted(self.projects)})

    @classmethod
    def loads(cls, raw: bytes | str) -> "Principal":
        data = orjson.loads(raw)
        return cls(data["user_id"], data["name"], frozenset(data["projects"]))


@dataclass(frozen=True)
class View:
    """What is known of a token (None: unknown or revoked), trusted until `expires` (time.monotonic())."""

    principal: Principal | None
    expires: float


def bearer_token(header: str | None) -> str:
    if not header:
        raise unauthorized()
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 256 or not token.isascii():
        raise unauthorized("Malformed Authorization header: expected 'Bearer <token>'.")
    return token


async def load_principal(conn_engine: AsyncEngine, hashed: str) -> Principal | None:
    async with conn_engine.connect() as conn:
        row = (await conn.execute(text(
            "SELECT u.id, u.name, t.token_hash, "
            "  coalesce(array_agg(m.project_id) FILTER (WHERE m.project_id IS NOT NULL), '{}') "
            "FROM api_tokens t JOIN users u ON u.id = t.user_id "
            "LEFT JOIN project_members m ON m.user_id = u.id "
            "WHERE t.token_hash = :h AND t.revoked_at IS NULL GROUP BY u.id, u.name, t.token_hash"
        ), {"h": hashed})).first()
    if row is None or not hmac.compare_digest(row[2], hashed):
        return None
    return Principal(row[0], row[1], frozenset(row[3]))


class FailureLimiter:
    """A token bucket per client address: an address may look up `burst` tokens that turn out unknown at once,
    then `per_second` more a second.

    A lookup spends from the bucket before it starts and a valid token pays it back, so that many lookups at
    once from one address cannot all pass the same full bucket.
    """

    def __init__(self, burst: int, per_second: float, addresses: int) -> None:
        self.burst = burst
        self.per_second = per_second
        self._buckets: Lru[str, tuple[float, float]] = Lru(addresses)  # address -> (tokens, at)

    def spend(self, address: str | None) -> int | None:
        """None if `address` may look up a token, and charge it; else the seconds until it may."""
        if self.burst <= 0 or address is None:
            return None
        now = time.monotonic()
        tokens = self._tokens(address, now)
        if tokens < 1:
            return max(1, math.ceil((1 - tokens) / self.per_second))
        self._buckets.put(address, (tokens - 1, now))
        return None

    def repay(self, address: str | None) -> None:
        if self.burst > 0 and address is not None:
            now = time.monotonic()
            self._buckets.put(address, (min(self.burst, self._tokens(address, now) + 1), now))

    def _tokens(self, address: str, now: float) -> float:
        held = self._buckets.get(address)
        if held is None:
            return float(self.burst)
        tokens, at = held
        return min(float(self.burst), tokens + (now - at) * self.per_second)


class Authenticator:
    def __init__(self, redis: Redis, engine: AsyncEngine, settings: Settings) -> None:
        self.redis = redis
        self.engine = engine
        self.cache_seconds = settings.auth_cache_seconds
        self.negative_seconds = settings.auth_negative_cache_seconds
        self.failures = FailureLimiter(settings.auth_failure_burst, settings.auth_failures_per_second,
                                       settings.auth_cache_entries)
        self._valid: Lru[str, View] = Lru(settings.auth_cache_entries)
        # Apart from the valid ones, so that a flood of made-up tokens cannot push those out.
        self._unknown: Lru[str, float] = Lru(settings.auth_cache_entries)
        self._scripts = ShimScripts(redis)
        # Lookups under way: when a cached token expires, the hundreds of requests in flight with it wait
        # for one lookup instead of each opening a Redis connection of its own.
        self._lookups: dict[str, asyncio.Future[View]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def authenticate(self, header: str | None) -> Principal:
        hashed = token_hash(bearer_token(header))
        now = time.monotonic()
        seen = self._valid.get(hashed)
        if seen is not None and seen.principal is not None and seen.expires > now:
            if now > seen.expires - self.cache_seconds / 2 and hashed not in self._lookups:
                self._start_lookup(hashed, fresher_than=self.cache_seconds / 2)
            return seen.principal
        unknown_until = self._unknown.get(hashed)
        if unknown_until is not None and unknown_until > now:
            raise unauthorized(UNKNOWN_TOKEN)
        # A token this process has seen valid is not a guess: it is looked up whatever its address has failed.
        charged = seen is None
        address = client_address.get()
        if charged and (wait := self.failures.spend(address)) is not None:
            principal = await self._without_database(hashed, wait)
        else:
            try:
                principal = await self._lookup(hashed)
            except BaseException:
                if charged:  # an outage is not the client's failure
                    self.failures.repay(address)
                raise
            if charged and principal is not None:
                self.failures.repay(address)
        if principal is None:
            raise unauthorized(UNKNOWN_TOKEN)
        return principal

    async def _lookup(self, hashed: str) -> Principal | None:
        future = self._lookups.get(hashed) or self._start_lookup(hashed)
        return (await asyncio.shield(future)).principal

    def _start_lookup(self, hashed: str, fresher_than: float = 0.0) -> "asyncio.Future[View]":
        future: asyncio.Future[View] = asyncio.get_running_loop().create_future()
        self._lookups[hashed] = future
        task = asyncio.create_task(self._run_lookup(hashed, fresher_than, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future

    async def _run_lookup(self, hashed: str, fresher_than: float, future: "asyncio.Future[View]") -> None:
        try:
            view = await self._read(hashed, fresher_than)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # the waiters, if any, see it; a refresh nobody waits for fails quietly
        else:
            self._remember(hashed, view)
            future.set_result(view)
        finally:
            del self._lookups[hashed]

    def _remember(self, hashed: str, view: View) -> None:
        if view.principal is None:
            self._valid.pop(hashed)
            self._unknown.put(hashed, view.expires)
        elif view.expires > time.monotonic():
            self._valid.put(hashed, view)

    async def _read(self, hashed: str, fresher_than: float) -> View:
        """The token's view from Redis if it has more than `fresher_than` seconds left there, else from
        PostgreSQL (written to Redis for the other shims), else, with PostgreSQL unreachable, its last valid view."""
        started = time.monotonic()
        cached = await self._from_redis(hashed, started)
        if cached is not None and cached.expires - started > fresher_than:
            return cached
        try:
            principal = await load_principal(self.engine, hashed)
        except DATABASE_DOWN:
            raw = await self.redis.get(last_valid_key(hashed))
            if raw is None:
                raise
            now = time.monotonic()
            if raw == REVOKED:
                return View(None, now + self.negative_seconds)
            return View(Principal.loads(raw), now + self.cache_seconds)
        lifetime = self.cache_seconds if principal is not None else self.negative_seconds
        left_ms = int((started + lifetime - time.monotonic()) * 1000)
        if left_ms > 0:
            await self._scripts.token_fill(auth_key(hashed), last_valid_key(hashed),
                                           principal.dumps() if principal else UNKNOWN, left_ms, LAST_VALID_SECONDS,
                                           UNKNOWN, REVOKED)
        return View(principal, started + lifetime)

    async def _from_redis(self, hashed: str, started: float) -> View | None:
        """The entry some shim wrote, trusted for what it has left (counted from `started`, before it was read)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(auth_key(hashed))
            pipe.pttl(auth_key(hashed))
            raw, left_ms = await pipe.execute()
        if raw is None or left_ms <= 0:  # an entry without an expiry is none of ours: read the database
            return None
        if raw == UNKNOWN:
            return View(None, started + left_ms / 1000)
        return View(Principal.loads(raw), started + min(left_ms / 1000, self.cache_seconds))

    async def _without_database(self, hashed: str, wait: int) -> Principal | None:
        """For an address that has failed too often: what some shim knows of the token, else 429."""
        future = self._lookups.get(hashed)
        if future is not None:
            return (await asyncio.shield(future)).principal
        view = await self._from_redis(hashed, time.monotonic())
        if view is None:
            raise ApiError(429, "Too many failed authentications from this address; try again later.",
                           headers={"Retry-After": str(wait)})
        self._remember(hashed, view)
        return view.principal
