"""How API tokens are stored (hashed) and where the shims cache what a token may reach."""

import hashlib

# How long the last valid view of a token stays in Redis, for the shims to fall back on while PostgreSQL is
# unreachable (api_shim/auth.py), and how long a revoke's tombstone keeps that view from coming back.
LAST_VALID_SECONDS = 24 * 3600
REVOKED = b"revoked"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def auth_key(hashed: str) -> str:
    """What a shim read about a token from PostgreSQL (or "null": no such token), for at most the cache time."""
    return f"ingest:token:{hashed}"


def last_valid_key(hashed: str) -> str:
    """The token's last valid view, or the REVOKED tombstone."""
    return f"ingest:token:last:{hashed}"
