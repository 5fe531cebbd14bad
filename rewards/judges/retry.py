"""Retry policy: which errors are worth another attempt, and how long to wait (backoff + jitter, ``Retry-After``).

Works on the exceptions of both SDKs without importing them: OpenAI errors carry ``status_code``, google-genai errors
``code``; both carry the HTTP ``response`` whose headers may hold ``Retry-After``.
"""
from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

MAX_DELAY_S = 60.0
_PERMANENT_STATUS = {400, 401, 403, 404, 405, 413, 422}


def status_code(exc: BaseException) -> int | None:
    for attr in ("status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    return None


def is_retryable(exc: BaseException) -> bool:
    """Everything is transient (timeouts, connection errors, 429, 5xx, broken bodies) except request/auth errors."""
    return status_code(exc) not in _PERMANENT_STATUS


def retry_after_seconds(exc: BaseException) -> float | None:
    """Seconds from ``Retry-After`` (or ``retry-after-ms``) on the error's HTTP response, if any."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except Exception:  # noqa: BLE001 - a malformed header just means "no hint"
        return None


def backoff_delay(attempt: int, base_s: float, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter on top of the base; never shorter than the server's ``Retry-After``."""
    exp = base_s * (2 ** attempt)
    delay = exp / 2 + random.uniform(0, exp / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, MAX_DELAY_S)
