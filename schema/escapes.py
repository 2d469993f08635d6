"""Escapes in JSON text that PostgreSQL text cannot hold as they stand: a lone surrogate (half of an emoji,
where the official CLI cut a value by UTF-16 length) and NUL. Each is replaced by U+FFFD, in the JSON text
itself, so that every parser downstream sees the same storable string (api_shim/repair.py, worker/apply.py).
"""

import re

# Every backslash escape that matters, scanned left to right so that an escaped backslash (`\\`) is consumed
# whole and the `u` after it is not misread: a well-formed surrogate pair (kept), a lone surrogate or NUL
# (replaced).
_ESCAPES = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u(?:[dD][89a-fA-F][0-9a-fA-F]{2}|0000)")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_REPLACEMENT = b"\\ufffd"  # U+FFFD REPLACEMENT CHARACTER


def _replace(match: re.Match[bytes]) -> bytes:
    escape = match.group(0)
    return _REPLACEMENT if len(escape) == 6 else escape


def has_unstorable_escape(body: bytes) -> bool:
    """Whether the body may hold a lone surrogate or NUL escape (a cheap test; `storable_escapes` decides)."""
    return b"\\u0000" in body or _SURROGATE_ESCAPE.search(body) is not None


def storable_escapes(body: bytes) -> bytes | None:
    """The body with each lone surrogate and NUL escape replaced by U+FFFD; None if it holds none."""
    repaired = _ESCAPES.sub(_replace, body)
    return None if repaired == body else repaired
