"""`Idempotency-Key` on every POST (beyond Testmo): a retry with the same key and the same request within a day
gets the first answer again, the same id for a create, and has no second effect; the same key with another
request is 422. Keys are the token's own: two tokens' keys never meet.

What a key was used for is kept in Redis by the very script that enqueues the request (schema/lua), so that
remembering it and its effect are one step: two retries racing each other cannot both take effect.
"""

import hashlib

from api_shim.errors import INVALID, ApiError
from schema.tokens import token_hash

HEADER = "idempotency-key"
KEY_MAX = 255


def idempotency(authorization: str | None, key: str | None, method: str, path: str, body: bytes) -> str:
    """What the enqueue scripts take for a request's key ("<redis key> <digest of the request>"), "" for none.
    The request is its method, its path and its body as sent."""
    if key is None:
        return ""
    if not 0 < len(key) <= KEY_MAX or not key.isascii() or not key.isprintable():
        raise ApiError(422, INVALID, {"Idempotency-Key": [
            f"must be 1 to {KEY_MAX} printable ASCII characters"]})
    scope = token_hash((authorization or "").partition(" ")[2].strip())[:32]
    request = hashlib.sha256(f"{method} {path}\n".encode() + body).hexdigest()[:32]
    return f"ingest:idem:{scope}:{hashlib.sha256(key.encode()).hexdigest()[:32]} {request}"


def conflict() -> ApiError:
    return ApiError(422, INVALID, {"Idempotency-Key": ["was used for another request (within the last day)"]})
