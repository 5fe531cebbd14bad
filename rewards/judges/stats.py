"""Thread-safe judge counters and latencies, reported as ``judge/*`` metrics and reset per training step."""
from __future__ import annotations

import threading


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class JudgeStats:
    """calls: judgements sent to the API; requests: HTTP attempts (retries included); latency: per call, seconds."""

    FIELDS = ("calls", "requests", "cache_hits", "no_verdict", "errors")

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def reset(self) -> None:
        with self._lock:
            self.counts = dict.fromkeys(self.FIELDS, 0)
            self.latencies: list[float] = []

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def add_latency(self, seconds: float) -> None:
        with self._lock:
            self.latencies.append(seconds)

    def metrics(self) -> dict[str, float]:
        with self._lock:
            c, lat = dict(self.counts), list(self.latencies)
        return {
            "judge/calls": float(c["calls"]), "judge/requests": float(c["requests"]),
            "judge/cache_hits": float(c["cache_hits"]), "judge/errors": float(c["errors"]),
            "judge/no_verdict": float(c["no_verdict"]),
            "judge/no_verdict_rate": c["no_verdict"] / c["calls"] if c["calls"] else 0.0,
            "judge/latency_p50": _percentile(lat, 0.5), "judge/latency_p95": _percentile(lat, 0.95),
        }
