"""Re-judge saved rows offline: ``python -m tools.judge --api-name NAME --input rows.jsonl --output out.jsonl``.

Each input row needs ``question``, ``response`` and ``ground_truth``. Rules decide first (as in training); rule
negatives go to the API judge, with the same cache, retries and strict parsing. Every row is written back with
``verdict`` (1, 0, −1 or null = no verdict) and ``source`` (rule, api, cache).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.judge", description=__doc__.splitlines()[0])
    p.add_argument("--api-name", required=True, help="gemini-* | deepseek-* | any OpenAI-compatible model name")
    p.add_argument("--base-url", default="", help="override the provider's endpoint")
    p.add_argument("--repetition", action="store_true", help="1 / 0 / -1 verdicts (-1: incorrect and repetitive)")
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


def _read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for n, row in enumerate(rows, 1):
        missing = [k for k in ("question", "response", "ground_truth") if k not in row]
        if missing:
            raise SystemExit(f"{path}: row {n} lacks {', '.join(missing)}")
    return rows


def _make_judge(args):
    from RL.rewards.config import JudgeConfig
    from tools.judges import CACHE_FILENAME, ApiJudge

    config = JudgeConfig(api_name=args.api_name, api_base_url=args.base_url, timeout_s=args.timeout,
                         max_retries=args.max_retries, retry_backoff_s=args.retry_backoff,
                         max_concurrency=args.concurrency, requests_per_minute=args.rpm,
                         api_kwargs={"temperature": args.temperature, "max_tokens": args.max_tokens},
                         use_cache=not args.no_cache)
    cache = None if args.no_cache else (args.cache or os.path.join(os.path.dirname(os.path.abspath(args.output)),
                                                                   CACHE_FILENAME))
    return ApiJudge(config, repetition=args.repetition, cache_path=cache)


def judge_rows(rows: list[dict], judge, repetition: bool) -> list[dict]:
    """Rule first; rule negatives to the API. Returns the rows with ``verdict`` and ``source`` added."""
    from RL.rewards.accuracy import rule_accuracy
    from RL.rewards.answer import extract_answer, strip_latents
    from tools.judges import JudgeRequest

    out = [dict(row) for row in rows]
    negatives = []
    for row in out:
        if rule_accuracy(str(row["response"]), str(row["ground_truth"])):
            row["verdict"], row["source"] = 1, "rule"
        else:
            negatives.append(row)
    requests = [JudgeRequest(str(r["question"]), strip_latents(str(r["response"])).strip() if repetition
                             else extract_answer(str(r["response"])), str(r["ground_truth"])) for r in negatives]
    for row, outcome in zip(negatives, judge.judge(requests)):
        row["verdict"] = outcome.verdict
        row["source"] = "rule" if outcome.source == "skip" else outcome.source
    return out


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from tools.judges import JudgeCredentialsError

    args = parse_args(argv)
    rows = _read_rows(args.input)
    try:
        judge = _make_judge(args)
    except JudgeCredentialsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results: list[dict] = []
    with tqdm(total=len(rows), desc="judging", unit="row") as bar:
        for start in range(0, len(rows), args.batch_size):
            batch = judge_rows(rows[start : start + args.batch_size], judge, args.repetition)
            results.extend(batch)
            bar.update(len(batch))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
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
    sys.exit(main())
