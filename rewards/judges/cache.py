"""Persistent verdict cache (sqlite) so a restart or a repeated sample never pays for the same judgement twice.

Only the hash of (api_name, mode, question, prediction, ground truth) and the verdict are stored: no prompt text and
never a key. Only real verdicts are cached, so "no verdict" results are retried on the next occurrence. Several
processes (Ray workers) may share one file; sqlite's locking serialises their writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time

CACHE_FILENAME = "judge_cache.sqlite"


def cache_key(api_name: str, mode: str, question: str, prediction: str, ground_truth: str) -> str:
    payload = json.dumps([api_name, mode, question, prediction, ground_truth], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class VerdictCache:
    """Thread-safe key → verdict store; the connection opens lazily so the object pickles into Ray actors."""

    def __init__(self, path: str):
        self.path = path
        self._conn = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self._conn.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict INTEGER NOT NULL, "
                               "created REAL NOT NULL)")
            self._conn.commit()
        return self._conn

    def get(self, key: str) -> int | None:
        with self._lock:
            row = self._connection().execute("SELECT verdict FROM verdicts WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def put(self, key: str, verdict: int) -> None:
        with self._lock:
            conn = self._connection()
            conn.execute("INSERT OR REPLACE INTO verdicts (key, verdict, created) VALUES (?, ?, ?)",
                         (key, int(verdict), time.time()))
            conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._connection().execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
