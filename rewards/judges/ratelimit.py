"""Requests-per-minute limiter shared by a judge's threads (spaces requests evenly; no bursts that trip a 429)."""
from __future__ import annotations

import threading
import time


class RateLimiter:
    """Hands out start slots 60/rpm seconds apart; ``rpm <= 0`` disables limiting."""

    def __init__(self, requests_per_minute: float):
        self.interval = 60.0 / requests_per_minute if requests_per_minute and requests_per_minute > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Block until this caller's slot; return the seconds waited."""
        if self.interval <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        wait = slot - now
        if wait > 0:
            time.sleep(wait)
        return wait
