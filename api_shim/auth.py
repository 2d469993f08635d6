"""Bearer tokens: hashed, looked up in a per-process cache, then Redis, then PostgreSQL.

Tokens are stored only as SHA-256 hashes. Lookups go by hash, so the secret is never compared byte by
byte; the final check uses a constant-time comparison anyway.
"""

import asyncio
import hmac
import time
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api_shim.errors import forbidden, unauthorized
from schema.tokens import auth_key, token_hash

REDIS_TTL_SECONDS = 24 * 3600
# A wrong token is remembered briefly too, so that guessing cannot turn into database load.
NEGATIVE_TTL_SECONDS = 2.0
MAX_CACHED = 100_000


@dataclass(frozen=True)
class Principal:
    user_id: int
    name: str
    projects: frozenset[int]

    def authorize(self, project_id: int) -> None:
        if project_id not in self.projects:
            raise forbidden()


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


class Authenticator:
    def __init__(self, redis: Redis, engine: AsyncEngine, cache_seconds: float) -> None:
        self.redis = redis
        self.engine = engine
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        # Lookups under way: when a cached token expires, the hundreds of requests in flight with it wait
        # for one lookup instead of each opening a Redis connection of its own.
        self._lookups: dict[str, asyncio.Future[Principal | None]] = {}

    async def authenticate(self, header: str | None) -> Principal:
        hashed = token_hash(bearer_token(header))
        hit = self._cache.get(hashed)
        if hit is not None and hit[0] > time.monotonic():
            principal = hit[1]
        elif hashed in self._lookups:
            principal = await asyncio.shield(self._lookups[hashed])
        else:
            future = self._lookups[hashed] = asyncio.get_running_loop().create_future()
            try:
                principal = await self._lookup(hashed)
                future.set_result(principal)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # the waiters, if any, see it; no "never retrieved" warning otherwise
                raise
            finally:
                del self._lookups[hashed]
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            ttl = self.cache_seconds if principal else NEGATIVE_TTL_SECONDS
            self._cache[hashed] = (time.monotonic() + ttl, principal)
        if principal is None:
            raise unauthorized("Unknown or revoked token.")
        return principal

    async def _lookup(self, hashed: str) -> Principal | None:
        raw = await self.redis.get(auth_key(hashed))
        if raw is not None:
            data = orjson.loads(raw)
            return Principal(data["user_id"], data["name"], frozenset(data["projects"]))
        principal = await load_principal(self.engine, hashed)
        if principal is not None:
            await self.redis.set(auth_key(hashed), orjson.dumps({
                "user_id": principal.user_id, "name": principal.name, "projects": sorted(principal.projects),
            }), ex=REDIS_TTL_SECONDS)
        return principal
