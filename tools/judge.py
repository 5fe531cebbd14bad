"""Re-judge saved rows offline: ``python -m tools.judge --api-name NAME --input rows.jsonl --output out.jsonl``.

Each input row (one JSON object per line, UTF-8) needs ``question``, ``response`` and ``ground_truth``; a malformed
line stops the run with ``error: FILE:LINE: what is wrong`` and status 2. Rules decide first (as in training); rule
negatives go to the API judge, with the same cache, retries and strict parsing, and a response with no extractable
answer is sent whole unless ``--skip-unextractable``. Every row is written back with ``verdict`` (1, 0, −1 or
null = no verdict) and ``source`` (rule, api, cache).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter

from common.atomic import atomic_open
from common.cli import ArgumentParser, InputError, UsageError, run_cli
from rewards.config import JudgeConfig
from rewards.judges import CACHE_FILENAME, ApiJudge
from rewards.judges.credentials import JudgeCredentialsError
from rewards.vlpo import judge_responses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m tools.judge", description=__doc__.splitlines()[0])
    p.add_argument("--api-name", required=True, help="gemini-* | deepseek-* | any OpenAI-compatible model name")
    p.add_argument("--base-url", default="", help="override the provider's endpoint")
    p.add_argument("--repetition", action="store_true", help="1 / 0 / -1 verdicts (-1: incorrect and repetitive)")
    p.add_argument("--skip-unextractable", action="store_true",
                   help="score responses without an extractable answer 0 by rule instead of asking the API")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--cache", default=None, help="verdict cache file (default: judge_cache.sqlite beside --output)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--max-retries", type=int, default=4)
    p.add_argument("--retry-backoff", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rpm", type=int, default=600)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64, help="rows judged per progress update")
    return p.parse_args(argv)


REQUIRED = ("question", "response", "ground_truth")


class RowError(InputError):
    """A malformed input line; the message is ``FILE:LINE: what is wrong``."""


def _parse_line(raw: bytes, where: str) -> dict | None:
    """One input line as a row (None for a blank line), or RowError saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RowError(f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None
    if not text.strip():
        return None
    try:
        row = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise RowError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise RowError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise RowError(f"{where}: missing {', '.join(missing)}")
    return row


def _read_rows(path: str) -> list[dict]:
    try:
        with open(path, "rb") as f:
            parsed = [_parse_line(raw, f"{path}:{number}") for number, raw in enumerate(f, 1)]
    except OSError as exc:
        raise RowError(f"{path}: {exc.strerror}") from None
    return [row for row in parsed if row is not None]


def _make_judge(args):
    config = JudgeConfig(api_name=args.api_name, api_base_url=args.base_url, timeout_s=args.timeout,
                         max_retries=args.max_retries, retry_backoff_s=args.retry_backoff,
                         max_concurrency=args.concurrency, requests_per_minute=args.rpm,
                         api_kwargs={"temperature": args.temperature, "max_tokens": args.max_tokens},
                         use_cache=not args.no_cache, skip_unextractable=args.skip_unextractable)
    cache = None if args.no_cache else (args.cache or os.path.join(os.path.dirname(os.path.abspath(args.output)),
                                                                   CACHE_FILENAME))
    try:
        return ApiJudge(config, repetition=args.repetition, cache_path=cache)
    except ValueError as error:  # a setting the judge cannot use
        raise UsageError(str(error)) from None


def judge_rows(rows: list[dict], judge, repetition: bool) -> list[dict]:
    """Rule first; rule negatives to the API. Returns the rows with ``verdict`` and ``source`` added."""
    items = [(str(r["question"]), str(r["response"]), str(r["ground_truth"])) for r in rows]
    out = []
    for row, judged in zip(rows, judge_responses(items, judge, repetition)):
        verdict, source = (judged.api_verdict, judged.api_source) if judged.asked else (judged.rule, "rule")
        out.append({**row, "verdict": verdict, "source": source})
    return out


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    rows = _read_rows(args.input)
    judge = _make_judge(args)
    results: list[dict] = []
    with tqdm(total=len(rows), desc="judging", unit="row") as bar:
        for start in range(0, len(rows), args.batch_size):
            batch = judge_rows(rows[start : start + args.batch_size], judge, args.repetition)
            results.extend(batch)
            bar.update(len(batch))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_open(args.output, encoding="utf-8") as f:  # a failed write never leaves a half-written --output
        for row in results:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    judge.close()
    verdicts = Counter("null" if r["verdict"] is None else str(r["verdict"]) for r in results)
    sources = Counter(r["source"] for r in results)
    m = judge.metrics()
    print(f"judged {len(results)} rows: verdicts {dict(sorted(verdicts.items()))}, sources {dict(sorted(sources.items()))}, "
          f"api calls {int(m['judge/calls'])}, cache hits {int(m['judge/cache_hits'])}, "
          f"no-verdict rate {m['judge/no_verdict_rate']:.3f}, latency p50 {m['judge/latency_p50']:.2f}s "
          f"p95 {m['judge/latency_p95']:.2f}s -> {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main, JudgeCredentialsError)
