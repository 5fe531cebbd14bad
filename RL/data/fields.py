"""How data values appear in messages: shortened, because one base64 image in an error line made 180 KB logs."""
from __future__ import annotations

from typing import Any

FIELD_CHARS = 80
DETAIL_CHARS = 200  # a skip's detail: room for a missing image's whole path (RL/data/images.py PATH_CHARS)


def shorten(value: Any, limit: int = FIELD_CHARS) -> str:
    """`value` as text of at most about `limit` characters: long text keeps its start and says how long it was."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 20]}... ({len(text)} chars)"
