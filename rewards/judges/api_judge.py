"""The fault-tolerant API judge: cache → rate limit → call with timeout → strict parse → retry → verdict or None.

Contract with training: ``judge`` never raises for anything the API or network does. A judgement that cannot be read
after all attempts is ``None`` ("no verdict"): the caller keeps its rule result and the miss is counted, never
scored as "incorrect". Clients, cache connection and thread pool are built on first use, so the object can be
created (or unpickled) inside a Ray actor.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .cache import CACHE_FILENAME, VerdictCache, cache_key
from .credentials import check_judge_credentials, redact
from .verdict_prompts import parse_verdict, system_prompt, user_prompt
from .providers import make_provider
from .ratelimit import RateLimiter
from .retry import backoff_delay, is_retryable, retry_after_seconds, status_code
from .stats import JudgeStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeRequest:
    question: str
    prediction: str  # the extracted answer (plain mode) or the full response (repetition mode)
    ground_truth: str


@dataclass(frozen=True)
class JudgeOutcome:
    verdict: int | None  # 1 correct, 0 incorrect, -1 incorrect and repetitive, None no verdict
    source: str  # "api" | "cache" | "skip" (empty prediction, judged incorrect without a call)


class ApiJudge:
    """Judges (question, prediction, ground truth) triples with one configured API model."""

    def __init__(self, config, repetition: bool = False, run_dir: str | None = None, cache_path: str | None = None):
        check_judge_credentials(config)
        if not config.api_name:
            raise ValueError("ApiJudge needs worker.rule_based_judge.api_name (empty means rules only)")
        self.config = config
        self.repetition = bool(repetition)
        if cache_path is None and run_dir and getattr(config, "use_cache", True):
            cache_path = os.path.join(run_dir, CACHE_FILENAME)
        self.cache_path = cache_path
        self.stats = JudgeStats()
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._provider = None
        self._cache = VerdictCache(self.cache_path) if self.cache_path else None
        self._limiter = RateLimiter(self.config.requests_per_minute)
        self._build_lock = threading.Lock()

    def __getstate__(self):
        return {"config": self.config, "repetition": self.repetition, "cache_path": self.cache_path}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.stats = JudgeStats()
        self._init_runtime()

    def __repr__(self) -> str:
        return f"ApiJudge(api_name={self.config.api_name!r}, mode={self.mode!r}, cache={self.cache_path!r})"

    @property
    def mode(self) -> str:
        return "repetition" if self.repetition else "plain"

    def _get_provider(self):
        with self._build_lock:
            if self._provider is None:
                self._provider = make_provider(self.config.api_name, self.config.api_base_url, self.config.timeout_s,
                                               self.config.api_kwargs)
            return self._provider

    def judge(self, requests: list[JudgeRequest]) -> list[JudgeOutcome]:
        """Verdicts in input order; identical requests are asked once; never raises for API/network faults."""
        outcomes: list[JudgeOutcome | None] = [None] * len(requests)
        pending: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            if not req.prediction.strip():
                outcomes[i] = JudgeOutcome(0, "skip")
                continue
            key = cache_key(self.config.api_name, self.mode, req.question, req.prediction, req.ground_truth)
            cached = self._cache_get(key) if key not in pending else None
            if cached is not None:
                self.stats.add("cache_hits")
                outcomes[i] = JudgeOutcome(cached, "cache")
            else:
                pending.setdefault(key, []).append(i)
        if pending:
            workers = max(1, min(int(self.config.max_concurrency), len(pending)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
                futures = {key: pool.submit(self._judge_uncached, key, requests[idx[0]]) for key, idx in pending.items()}
            for key, indices in pending.items():
                verdict = futures[key].result()
                for i in indices:
                    outcomes[i] = JudgeOutcome(verdict, "api")
        return outcomes

    def judge_one(self, question: str, prediction: str, ground_truth: str) -> JudgeOutcome:
        return self.judge([JudgeRequest(question, prediction, ground_truth)])[0]

    def _cache_get(self, key: str) -> int | None:
        if self._cache is None:
            return None
        try:
            return self._cache.get(key)
        except Exception as exc:  # noqa: BLE001 - a broken cache file must not stop judging
            logger.warning("judge cache read failed (%s); judging without it", type(exc).__name__)
            return None

    def _cache_put(self, key: str, verdict: int) -> None:
        if self._cache is None:
            return
        try:
            self._cache.put(key, verdict)
        except Exception as exc:  # noqa: BLE001
            logger.warning("judge cache write failed (%s)", type(exc).__name__)

    def _judge_uncached(self, key: str, req: JudgeRequest) -> int | None:
        start = time.monotonic()
        self.stats.add("calls")
        try:
            verdict = self._call_with_retries(req)
        except Exception as exc:  # noqa: BLE001 - last line of defence: no fault of the API reaches training
            logger.warning("judge call failed: %s", redact(f"{type(exc).__name__}: {exc}"))
            verdict = None
        self.stats.add_latency(time.monotonic() - start)
        if verdict is None:
            self.stats.add("no_verdict")
        else:
            self._cache_put(key, verdict)
        return verdict

    def _call_with_retries(self, req: JudgeRequest) -> int | None:
        provider = self._get_provider()
        system, user = system_prompt(self.repetition), user_prompt(req.question, req.prediction, req.ground_truth)
        attempts = int(self.config.max_retries) + 1
        for attempt in range(attempts):
            self._limiter.acquire()
            self.stats.add("requests")
            retry_after = None
            try:
                verdict = parse_verdict(provider.complete(system, user), self.repetition)
                if verdict is not None:
                    return verdict
                logger.debug("judge reply unreadable (attempt %d/%d)", attempt + 1, attempts)
            except Exception as exc:  # noqa: BLE001 - classified below, never propagated
                self.stats.add("errors")
                logger.info("judge attempt %d/%d failed: %s (status %s)", attempt + 1, attempts,
                            type(exc).__name__, status_code(exc))
                if not is_retryable(exc):
                    return None
                retry_after = retry_after_seconds(exc)
            if attempt + 1 < attempts:
                time.sleep(backoff_delay(attempt, getattr(self.config, "retry_backoff_s", 1.0), retry_after))
        return None

    def metrics(self, reset: bool = False) -> dict[str, float]:
        out = self.stats.metrics()
        if reset:
            self.stats.reset()
        return out

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
