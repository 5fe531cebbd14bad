"""The API judge against real loopback servers (OpenAI chat-completions and Gemini generateContent) with faults.

Each fault must end in either the right verdict or "no verdict"; nothing may raise, the cache must stop repeat calls
(counted on the server), and no key may appear in logs, output, reprs, pickles or the cache file.
"""
import contextlib
import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rewards import RewardInput, RewardManager
from rewards.config import JudgeConfig, RewardConfig
from rewards.ireasoner import judge_answers
from rewards.judges import ApiJudge, JudgeCredentialsError, JudgeRequest, check_judge_credentials, parse_verdict, redact
from rewards.judges.local_server import LocalJudgeServer
from rewards.judges.verdict_prompts import clean_question, user_prompt
from rewards.judges.ratelimit import RateLimiter
from rewards.judges.retry import backoff_delay
from rewards.vlpo import judge_responses

KEYS = {"OPENAI_API_KEY": "sk-test-openai-SECRET-1111", "GOOGLE_API_KEY": "g-test-google-SECRET-2222",
        "DEEPSEEK_API_KEY": "ds-test-deepseek-SECRET-3333"}


@contextlib.contextmanager
def env(**values):
    """Set (or with None, remove) environment variables for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(params=["openai", "gemini"])
def provider(request):
    """(api_name, key variable, server, base URL) for each protocol, with every key variable set."""
    name, var = {"openai": ("gpt-judge-test", "OPENAI_API_KEY"), "gemini": ("gemini-judge-test", "GOOGLE_API_KEY")}[
        request.param]
    # slow_s well above timeout_s, and timeout_s well above a loaded machine's reply time: only "slow" times out
    with env(**KEYS), LocalJudgeServer(key=KEYS[var], slow_s=6.0, retry_after_s=1.0) as server:
        base = server.base_url + ("/v1" if request.param == "openai" else "")
        yield name, var, server, base


def config(name, base, **kw):
    return JudgeConfig(api_name=name, api_base_url=base, timeout_s=2.0, max_retries=2, retry_backoff_s=0.05,
                       requests_per_minute=0, **kw)


def assert_no_secret(*texts):
    for text in texts:
        for secret in KEYS.values():
            assert secret not in text


# question marker, prediction, expected verdict (None = no verdict)
CASES = [
    ("", "dark red", 1), ("", "blue", 0), ("[fault:slow]", "red", None), ("[fault:429once]", "red", 1),
    ("[fault:429]", "red", None), ("[fault:500]", "red", None), ("[fault:500once]", "blue", 0),
    ("[fault:truncated]", "red", None), ("[fault:maybe]", "red", None),
]


def requests_for(cases):
    return [JudgeRequest(f"What color is the car {tag}? Put the final answer in \\boxed{{}}.", pred, "red")
            for tag, pred, _ in cases]


def test_faults_give_right_verdict_or_none_and_cache_stops_repeats(provider, tmp_path, caplog, capsys):
    name, _var, server, base = provider
    caplog.set_level(logging.DEBUG)
    judge = ApiJudge(config(name, base), run_dir=str(tmp_path))
    start = time.monotonic()
    outcomes = judge.judge(requests_for(CASES))
    elapsed = time.monotonic() - start
    assert [o.verdict for o in outcomes] == [expected for _, _, expected in CASES]
    assert elapsed >= 1.0  # the 429's Retry-After (1 s) was honoured before the successful retry
    assert server.hits["500"] == 3 and server.hits["maybe"] == 3  # every attempt answered, so every attempt counted
    # A timed-out attempt may be cut before it reaches the server on a loaded machine: at most 3, never more.
    settle_until = time.monotonic() + 5.0
    while server.hits["slow"] < 3 and time.monotonic() < settle_until:
        time.sleep(0.05)
    assert 1 <= server.hits["slow"] <= 3
    assert server.hits["429once"] == 2 and server.hits["500once"] == 2 and server.unauthorized == 0
    metrics = judge.metrics(reset=True)
    assert metrics["judge/calls"] == len(CASES) and metrics["judge/cache_hits"] == 0
    assert metrics["judge/no_verdict_rate"] == pytest.approx(5 / 9)
    assert 0 < metrics["judge/latency_p50"] <= metrics["judge/latency_p95"]

    # Repeat in a fresh judge (a restart): answered verdicts come from the cache, no-verdicts are asked again.
    answered = [c for c in CASES if c[2] is not None]
    before = server.total_hits()
    again = ApiJudge(config(name, base), run_dir=str(tmp_path)).judge(requests_for(answered))
    assert [o.verdict for o in again] == [c[2] for c in answered] and {o.source for o in again} == {"cache"}
    assert server.total_hits() == before

    cache_bytes = (tmp_path / "judge_cache.sqlite").read_bytes()
    out, err = capsys.readouterr()
    assert_no_secret(caplog.text, out, err, cache_bytes.decode("latin-1"), repr(judge), str(pickle.dumps(judge)))


def test_repetition_mode(provider, tmp_path):
    name, _var, server, base = provider
    judge = ApiJudge(config(name, base), repetition=True)
    loop = "Let me look again. Let me look again. Let me look again. Let me look again. \\boxed{blue}"
    outcomes = judge.judge([JudgeRequest("Color?", "so \\boxed{red}", "red"), JudgeRequest("Color?", "\\boxed{blue}", "red"),
                            JudgeRequest("Color?", loop, "red"), JudgeRequest("Color? [fault:maybe]", "x", "red")])
    assert [o.verdict for o in outcomes] == [1, 0, -1, None]


def test_identical_requests_are_asked_once_and_empty_predictions_skip_the_api(provider):
    name, _var, server, base = provider
    judge = ApiJudge(config(name, base))  # no run_dir: no persistent cache
    outcomes = judge.judge([JudgeRequest("Q", "dark red", "red")] * 4 + [JudgeRequest("Q", "  ", "red")])
    assert [o.verdict for o in outcomes] == [1, 1, 1, 1, 0] and outcomes[-1].source == "skip"
    assert server.total_hits() == 1


def test_wrong_key_is_not_retried(provider):
    name, var, server, base = provider
    with env(**{var: "wrong-key-value"}):
        outcome = ApiJudge(config(name, base)).judge_one("Q", "red", "red")
    assert outcome.verdict is None and server.unauthorized == 1


def test_unreachable_endpoint_gives_no_verdict():
    with env(**KEYS):
        judge = ApiJudge(config("gpt-x", "http://127.0.0.1:9/v1", max_concurrency=2))
        assert judge.judge_one("Q", "red", "red").verdict is None
        assert judge.metrics()["judge/no_verdict_rate"] == 1.0


def test_vlpo_reward_uses_api_only_for_rule_negatives(provider, tmp_path, caplog):
    name, _var, server, base = provider
    caplog.set_level(logging.DEBUG)
    manager = RewardManager(RewardConfig(), config(name, base), run_dir=str(tmp_path))
    manager = pickle.loads(pickle.dumps(manager))  # as shipped into a Ray actor
    samples = [RewardInput("What color is the car?", r"\boxed{red}", "red", group_id="g"),
               RewardInput("What color is the car?", r"\boxed{dark red}", "red", group_id="g"),
               RewardInput("What color is the car?", r"\boxed{blue}", "red", group_id="g"),
               RewardInput("What color is the car? [fault:500]", r"\boxed{dark red}", "red", group_id="h")]
    result = manager.compute(samples)
    assert result.overall == pytest.approx([1.0, 1.0, 0.1, 0.1])  # API rescued #2; #4's failure kept the rule 0
    assert result.components["api_judged"] == [0.0, 1.0, 1.0, 0.0]
    assert result.components["api_no_verdict"] == [0.0, 0.0, 0.0, 1.0]  # the failure is recorded, not a verdict
    assert server.hits["none"] == 2 and server.hits["500"] == 3  # the rule positive never reached the API
    assert result.metrics["judge/calls"] == 3 and result.metrics["judge/no_verdict_rate"] == pytest.approx(1 / 3)
    assert result.metrics["reward/accuracy"] == 0.5
    assert_no_secret(caplog.text, repr(manager), str(pickle.dumps(manager)))


UNEXTRACTABLE = [  # no \\boxed{} and no "... is X": the rules find no answer
    RewardInput("What color is the car?", "<latent×4> I looked closely: the car looks dark red to me", "red"),
    RewardInput("What color is the car?", "<abs_vis_token><latent×4></abs_vis_token> I cannot tell the color", "red"),
    RewardInput("What color is the car? [fault:500]", "It looks red", "red"),
]


def test_unextractable_responses_go_to_the_judge_and_record_what_decided(provider):
    name, _var, server, base = provider
    result = RewardManager(RewardConfig(), config(name, base)).compute(UNEXTRACTABLE)
    assert result.components["unextractable"] == [1.0, 1.0, 1.0]
    assert result.components["verdict"] == [1.0, 0.0, 0.0]  # the judge found the unboxed "red"
    assert result.components["api_judged"] == [1.0, 1.0, 0.0]
    assert result.components["api_no_verdict"] == [0.0, 0.0, 1.0]  # the API failure stays "no verdict"
    assert server.hits["none"] == 2 and server.hits["500"] == 3


def test_skip_unextractable_keeps_monets_no_call_rule(provider):
    name, _var, server, base = provider
    result = RewardManager(RewardConfig(), config(name, base, skip_unextractable=True)).compute(
        UNEXTRACTABLE + [RewardInput("What color is the car?", r"\boxed{dark red}", "red")])
    assert result.components["verdict"] == [0.0, 0.0, 0.0, 1.0]
    assert result.components["api_judged"] == [0.0, 0.0, 0.0, 1.0]  # only the boxed answer was asked
    assert result.components["api_no_verdict"] == [0.0] * 4
    assert server.total_hits() == 1


def test_repetition_penalty_in_vlpo_reward(provider):
    name, _var, server, base = provider
    manager = RewardManager(RewardConfig(repetition_penalty=True), config(name, base))
    loop = "The count is 3. The count is 3. The count is 3. The count is 3. \\boxed{3}"
    result = manager.compute([RewardInput("How many?", loop, "4"), RewardInput("How many?", r"\boxed{4}", "4")])
    assert result.components["verdict"] == [-1.0, 1.0]
    assert result.overall == pytest.approx([-0.9 + 0.1, 1.0])


@pytest.mark.parametrize("name, var", [("gemini-2.5-pro", "GOOGLE_API_KEY"), ("deepseek-chat", "DEEPSEEK_API_KEY"),
                                       ("gpt-4o", "OPENAI_API_KEY")])
def test_missing_key_is_refused_naming_the_variable(name, var):
    with env(**{var: None}):
        with pytest.raises(JudgeCredentialsError, match=var):
            check_judge_credentials(JudgeConfig(api_name=name))
        with pytest.raises(JudgeCredentialsError, match=var):
            RewardManager(RewardConfig(), JudgeConfig(api_name=name))
    check_judge_credentials(JudgeConfig(api_name=""))  # rules only: nothing to check


def test_question_cleaning_drops_the_box_instruction():
    assert clean_question("What color is the car? Put the final answer in \\boxed{}.") == "What color is the car?"
    assert "boxed" not in user_prompt("Q? Answer in \\boxed{} please.", "red", "red")


def test_strict_parser():
    assert [parse_verdict(t, False) for t in ["yes", " Yes.", "**no**", "NO\n", "<think>hmm yes</think>no"]] == [1, 1, 0, 0, 0]
    assert [parse_verdict(t, False) for t in ["maybe", "yes, no", "no, wait, yes", "", None, "1"]] == [None] * 6
    assert [parse_verdict(t, True) for t in ["1", "0", "-1", "\u22121", " -1. "]] == [1, 0, -1, -1, -1]
    assert [parse_verdict(t, True) for t in ["10", "1 or 0", "yes", "-1 0", "-"]] == [None] * 5


def test_backoff_and_rate_limit():
    assert backoff_delay(0, 0.1, retry_after=2.0) == 2.0
    assert all(0.05 <= backoff_delay(0, 0.1) <= 0.1 for _ in range(20))
    assert backoff_delay(10, 1.0) <= 60.0
    limiter = RateLimiter(1200)  # one start every 50 ms
    start = time.monotonic()
    for _ in range(5):
        limiter.acquire()
    assert time.monotonic() - start >= 0.19


def test_redact():
    with env(**KEYS):
        assert redact(f"error with {KEYS['OPENAI_API_KEY']} inside") == "error with *** inside"


def test_cli_rejudges_rows(provider, tmp_path, capsys):
    from tools.judge import main

    name, _var, server, base = provider
    rows = [{"question": "Color?", "response": r"\boxed{red}", "ground_truth": "red", "id": 1},
            {"question": "Color?", "response": r"\boxed{dark red}", "ground_truth": "red", "id": 2},
            {"question": "Color?", "response": r"\boxed{blue}", "ground_truth": "red", "id": 3},
            {"question": "Color? [fault:truncated]", "response": r"\boxed{crimson}", "ground_truth": "red", "id": 4},
            {"question": "Color?", "response": "<latent×2> the car looks red to me", "ground_truth": "red", "id": 5}]
    src, dst = tmp_path / "rows.jsonl", tmp_path / "out" / "judged.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--api-name", name, "--base-url", base, "--input", str(src), "--output", str(dst), "--timeout", "0.5",
            "--max-retries", "1", "--retry-backoff", "0.05"]
    assert main(args) == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [(r["id"], r["verdict"], r["source"]) for r in out] == [(1, 1, "rule"), (2, 1, "api"), (3, 0, "api"),
                                                                  (4, None, "api"), (5, 1, "api")]
    assert main(args) == 0  # second run: the answered rows come from the cache
    assert [r["source"] for r in map(json.loads, dst.read_text().splitlines())] == ["rule", "cache", "cache", "api",
                                                                                   "cache"]
    captured = capsys.readouterr()
    assert "judged 5 rows" in captured.out and "cache hits 3" in captured.out
    assert_no_secret(captured.out, captured.err, dst.read_text())


def test_provider_routing():
    from rewards.judges import provider_spec

    assert provider_spec("gemini-2.5-pro").kind == "gemini" and provider_spec("gemini-2.5-pro").base_url is None
    assert provider_spec("deepseek-chat") == provider_spec("deepseek-reasoner")
    assert provider_spec("deepseek-chat").base_url == "https://api.deepseek.com"
    assert provider_spec("deepseek-chat", "http://gw/v1").base_url == "http://gw/v1"
    with env(OPENAI_BASE_URL="http://local:8000/v1"):
        assert provider_spec("qwen-judge").base_url == "http://local:8000/v1"
        assert provider_spec("qwen-judge", "http://other/v1").base_url == "http://other/v1"


def test_deepseek_uses_its_own_key():
    with env(**KEYS), LocalJudgeServer(key=KEYS["DEEPSEEK_API_KEY"]) as server:
        judge = ApiJudge(config("deepseek-chat", server.base_url + "/v1"))
        assert judge.judge_one("Color?", "red", "red").verdict == 1 and server.unauthorized == 0


GOOD_ROW = b'{"question": "Q", "response": "r", "ground_truth": "g"}\n'


@pytest.mark.parametrize("content, line, message", [
    (GOOD_ROW + b'{"question": "Q", "response": \n', 2, "invalid JSON (Expecting value at column 31)"),
    (GOOD_ROW + b'{"question": "caf\xe9", "response": "r", "ground_truth": "g"}\n', 2,
     "not UTF-8 (byte 0xe9 at column 18)"),
    (b"\n" + b"[1, 2]\n", 2, "expected a JSON object, got list"),
    (b'{"question": "Q"}\n', 1, "missing response, ground_truth"),
])
def test_cli_malformed_input_names_file_and_line(content, line, message, tmp_path):
    src, dst = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(content)
    done = subprocess.run([sys.executable, "-m", "tools.judge", "--api-name", "gpt-x", "--input", str(src),
                           "--output", str(dst)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent, env={**os.environ, **KEYS})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == f"error: {src}:{line}: {message}"
    assert not dst.exists()


class BrokenJudge(ApiJudge):
    """A judge whose whole call fails (a custom judge, or a bug in one): every reward must read it as no verdict."""

    def judge(self, requests):
        raise ConnectionError("judge down")


def test_rules_then_judge_is_shared_and_a_failing_judge_is_no_verdict(provider):
    name, _var, _server, base = provider
    working, broken = ApiJudge(config(name, base)), BrokenJudge(config(name, base))
    questions, truths = ["What color is the car?"] * 3, ["red"] * 3
    assert judge_answers(questions, ["red", "dark red", "blue"], truths, working) == [1, 1, 0]
    assert judge_answers(questions, ["red", "dark red", "blue"], truths, broken) == [1, 0, 0]  # the rules stand
    judged = judge_responses([(q, rf"\boxed{{{p}}}", t) for q, p, t in zip(questions, ["red", "dark red"], truths)],
                             broken)
    assert [(j.asked, j.api_verdict, j.verdict) for j in judged] == [(False, None, 1), (True, None, 0)]
