"""Administrative operations on projects, users, tokens, configs, milestones and webhooks."""

import secrets
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from redis import Redis
from sqlalchemy import Connection, create_engine, text

from schema.protocol import Batch, WorkerScripts
from schema.settings import Settings
from schema.tokens import LAST_VALID_SECONDS, REVOKED, auth_key, last_valid_key, token_hash


class AdminError(Exception):
    pass


class Admin:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = create_engine(settings.database_url)
        self.redis = Redis.from_url(settings.redis_url)

    def close(self) -> None:
        self.engine.dispose()
        self.redis.close()

    def create_project(self, name: str, exist_ok: bool = False) -> int:
        with self.engine.begin() as conn:
            row = conn.execute(text("INSERT INTO projects (name) VALUES (:n) ON CONFLICT (name) DO NOTHING "
                                    "RETURNING id"), {"n": name}).first()
            if row is not None:
                return int(row[0])
            if not exist_ok:
                raise AdminError(f"a project named {name!r} exists already")
            return int(conn.execute(text("SELECT id FROM projects WHERE name = :n"), {"n": name}).scalar_one())

    def set_retention(self, project_id: int, days: int | None) -> None:
        """Keep the project's completed runs `days` days (0: forever; None: INGEST_RETENTION_DAYS)."""
        with self.engine.begin() as conn:
            self._require_project(conn, project_id)
            conn.execute(text("UPDATE projects SET retention_days = :d WHERE id = :p"), {"d": days, "p": project_id})

    def create_named(self, table: str, project_id: int, name: str) -> int:
        """A config or a milestone in a project."""
        assert table in ("configs", "milestones")
        with self.engine.begin() as conn:
            self._require_project(conn, project_id)
            row = conn.execute(text(f"INSERT INTO {table} (project_id, name) VALUES (:p, :n) "
                                    "ON CONFLICT (project_id, name) DO NOTHING RETURNING id"),
                               {"p": project_id, "n": name}).first()
            if row is None:
                raise AdminError(f"{table[:-1]} {name!r} exists already in project {project_id}")
            return int(row[0])

    def create_token(self, user: str, project_ids: list[int]) -> str:
        """A new token for `user` (created if needed), who is granted access to `project_ids`."""
        token = "ingest_" + secrets.token_urlsafe(30)
        with self.engine.begin() as conn:
            for project_id in project_ids:
                self._require_project(conn, project_id)
            user_id = conn.execute(text(
                "INSERT INTO users (name) VALUES (:n) ON CONFLICT (name) DO UPDATE SET name = excluded.name "
                "RETURNING id"), {"n": user}).scalar_one()
            for project_id in project_ids:
                conn.execute(text("INSERT INTO project_members (project_id, user_id) VALUES (:p, :u) "
                                  "ON CONFLICT DO NOTHING"), {"p": project_id, "u": user_id})
            conn.execute(text("INSERT INTO api_tokens (user_id, token_hash) VALUES (:u, :h)"),
                         {"u": user_id, "h": token_hash(token)})
            self._forget_user_tokens(conn, user_id)
        return token

    def revoke_token(self, token: str) -> None:
        hashed = token_hash(token)
        with self.engine.begin() as conn:
            row = conn.execute(text("UPDATE api_tokens SET revoked_at = now() "
                                    "WHERE token_hash = :h AND revoked_at IS NULL RETURNING id"),
                               {"h": hashed}).first()
        if row is None:
            raise AdminError("no such active token")
        # The shims stop trusting what they read before the revoke by themselves, within the cache time; the
        # delete makes it sooner for those that have not read it yet. The tombstone keeps the token's last
        # valid view, which shims fall back on while PostgreSQL is unreachable, from letting it in again.
        pipe = self.redis.pipeline()
        pipe.delete(auth_key(hashed))
        pipe.set(last_valid_key(hashed), REVOKED, ex=LAST_VALID_SECONDS)
        pipe.execute()

    def _forget_user_tokens(self, conn: Connection, user_id: int) -> None:
        # The shims would see a grant within the cache time anyway; this makes it sooner. Revoked tokens keep
        # their tombstones.
        hashes = conn.execute(text("SELECT token_hash FROM api_tokens WHERE user_id = :u AND revoked_at IS NULL"),
                              {"u": user_id}).scalars().all()
        if hashes:
            self.redis.delete(*(key for h in hashes for key in (auth_key(h), last_valid_key(h))))

    # --- dead letters ---------------------------------------------------------------------------------------

    def dead_letters(self, include_applied: bool = False) -> list[dict[str, Any]]:
        """Dead letters, oldest first; `state` is dead, replayed (queued again) or applied (by a replay)."""
        with self.engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT d.id, d.op_id, d.kind, d.run_id, d.thread_id, d.error, d.failures, d.created_at, "
                "  d.replayed_at, a.id IS NOT NULL AS applied "
                "FROM dead_letters d LEFT JOIN applied_ops a ON a.id = d.op_id "
                "WHERE :all OR a.id IS NULL ORDER BY d.id"), {"all": include_applied}).mappings().all()
        return [dict(row) | {"state": "applied" if row["applied"] else "replayed" if row["replayed_at"] else "dead"}
                for row in rows]

    def replay(self, ids: list[int] | None, progress: Callable[[int, int], None] = lambda done, total: None) -> int:
        """Queue dead-lettered operations again (all not yet applied, or those `ids`); how many were queued.

        A replayed operation keeps its id, so replaying twice, or a replay racing the original, still applies
        it once. It does not count towards any completion barrier again: it was counted when first accepted.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT d.id, d.payload FROM dead_letters d "
                "WHERE (CAST(:ids AS bigint[]) IS NULL OR d.id = ANY(:ids)) "
                "AND NOT EXISTS (SELECT 1 FROM applied_ops a WHERE a.id = d.op_id) ORDER BY d.id"),
                {"ids": ids}).all()
        scripts = WorkerScripts(self.redis)
        for done, (letter_id, payload) in enumerate(rows, 1):
            # Marked before it is queued: a worker applies an operation past its dedupe window only as a replay
            # an operator asked for (worker/apply.py `claim`), and may get to it at once.
            with self.engine.begin() as conn:
                conn.execute(text("UPDATE dead_letters SET replayed_at = now() WHERE id = :id"), {"id": letter_id})
            scripts.replay(Batch.new(self.settings.queue), orjson.dumps([payload]))
            progress(done, len(rows))
        return len(rows)

    # --- webhooks (worker/webhooks.py delivers them) ------------------------------------------------------------

    def create_webhook(self, project_id: int, url: str, secret: str | None = None) -> tuple[int, str]:
        """A webhook of the project: (its id, its secret, generated when none is given)."""
        check_webhook_url(url)
        if secret is not None and not secret:
            raise AdminError("the secret must not be empty")
        secret = secret or secrets.token_hex(32)
        with self.engine.begin() as conn:
            self._require_project(conn, project_id)
            webhook_id = conn.execute(text("INSERT INTO webhooks (project_id, url, secret) VALUES (:p, :u, :s) "
                                           "RETURNING id"), {"p": project_id, "u": url, "s": secret}).scalar_one()
        return int(webhook_id), secret

    def webhooks(self) -> list[dict[str, Any]]:
        """Every webhook, without its secret."""
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT id, project_id, url, created_at FROM webhooks ORDER BY id")).mappings()
            return [dict(row) for row in rows]

    def delete_webhook(self, webhook_id: int) -> None:
        """Remove a webhook, with the record of its deliveries (pending ones are not sent)."""
        with self.engine.begin() as conn:
            if conn.execute(text("DELETE FROM webhooks WHERE id = :id RETURNING id"), {"id": webhook_id}).first() \
                    is None:
                raise AdminError(f"no webhook with id {webhook_id}")

    def deliveries(self, failed_only: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
        """The latest deliveries first (only those that failed for good, with `failed_only`)."""
        with self.engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT id, webhook_id, run_id, state, attempts, last_status, last_error, occurred_at, created_at, "
                "  next_attempt_at, delivered_at FROM webhook_deliveries "
                "WHERE NOT :failed OR state = 'failed' ORDER BY created_at DESC, id LIMIT :limit"),
                {"failed": failed_only, "limit": limit}).mappings()
            return [dict(row) | {"id": str(row["id"])} for row in rows]

    def redeliver(self, delivery_id: str) -> int:
        """Put a failed or delivered delivery back to pending, with a fresh retry window (counted from its
        `created_at`, which restarts now) and its body unchanged; the run it is for. The caller sends it."""
        try:
            uuid.UUID(delivery_id)
        except ValueError:
            raise AdminError(f"{delivery_id!r} is not a delivery id (a UUID)") from None
        with self.engine.begin() as conn:
            row = conn.execute(text("SELECT state, run_id FROM webhook_deliveries WHERE id = :id FOR UPDATE"),
                               {"id": delivery_id}).first()
            if row is None:
                raise AdminError(f"no delivery with id {delivery_id}")
            if row[0] == "pending":
                raise AdminError(f"delivery {delivery_id} is pending already: it is being tried")
            conn.execute(text(
                "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, created_at = now(), "
                "next_attempt_at = now(), leased_until = NULL, delivered_at = NULL WHERE id = :id"),
                {"id": delivery_id})
            return int(row[1])

    @staticmethod
    def _require_project(conn: Connection, project_id: int) -> None:
        if conn.execute(text("SELECT 1 FROM projects WHERE id = :p"), {"p": project_id}).first() is None:
            raise AdminError(f"no project with id {project_id}")


def check_webhook_url(url: str) -> None:
    """Only http and https URLs with a host: a receiver is reached by POST, nothing else."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (an invalid port raises)
    except ValueError as exc:
        raise AdminError(f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise AdminError(f"invalid URL {url!r}: only http:// and https:// URLs are accepted")
    if not host:
        raise AdminError(f"invalid URL {url!r}: no host")
