"""How API tokens are stored (hashed) and where the shims cache what a token may reach."""

import hashlib


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def auth_key(hashed: str) -> str:
    return f"ingest:auth:{hashed}"
