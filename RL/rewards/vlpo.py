"""Monet's VLPO reward: overall = 0.9·accuracy + 0.1·format − length_penalty_weight·length_penalty.

Correctness is judged by rules first; only rule negatives go to the API judge (when one is configured), whose verdict
replaces the rule result unless it is "no verdict". In repetition mode the verdict may be −1 (incorrect and looping),
which makes the accuracy term negative. Components: ``accuracy`` (1/0, fraction correct), ``verdict`` (1/0/−1, the
value in the reward), ``format``, ``length_penalty`` (tokens) and ``api_judged`` (1 when the API decided).
"""
from __future__ import annotations

import hashlib
import logging

from .accuracy import rule_accuracy
from .answer import extract_answer, strip_latents
from .format_reward import boxed_format_reward
from .interface import RewardInput
from .length import LengthReference, group_length_penalties

logger = logging.getLogger(__name__)


def _question(sample: RewardInput) -> str:
    for key in ("question", "problem"):
        if isinstance(sample.extra.get(key), str) and sample.extra[key].strip():
            return sample.extra[key]
    return sample.prompt


def _prediction(sample: RewardInput, repetition: bool) -> str:
    """Plain mode judges the extracted answer; repetition mode needs the whole response to see loops."""
    return strip_latents(sample.response).strip() if repetition else extract_answer(sample.response)


def _prompt_key(sample: RewardInput) -> str:
    return hashlib.sha1(f"{sample.prompt}\x00{sample.ground_truth}".encode()).hexdigest()


def judge_verdicts(samples: list[RewardInput], judge=None, repetition_penalty: bool = False) -> tuple[list[int], list[bool]]:
    """Rule verdicts, with rule negatives re-judged by the API; returns (verdicts, decided_by_api)."""
    from tools.judges import JudgeRequest

    verdicts = [int(rule_accuracy(s.response, s.ground_truth)) for s in samples]
    by_api = [False] * len(samples)
    negatives = [i for i, v in enumerate(verdicts) if v == 0]
    if judge is None or not negatives:
        return verdicts, by_api
    requests = [JudgeRequest(_question(samples[i]), _prediction(samples[i], repetition_penalty),
                             str(samples[i].ground_truth)) for i in negatives]
    try:
        outcomes = judge.judge(requests)
    except Exception as exc:  # noqa: BLE001 - the judge is a fallback: its failure leaves the rule verdicts
        logger.warning("API judge failed (%s); keeping rule verdicts", type(exc).__name__)
        return verdicts, by_api
    for i, outcome in zip(negatives, outcomes):
        if outcome.verdict is not None and outcome.source != "skip":
            verdicts[i], by_api[i] = int(outcome.verdict), True
    return verdicts, by_api


def vlpo_reward(samples: list[RewardInput], judge=None, repetition_penalty: bool = False,
                length_penalty_weight: float = 0.0, length_reference: LengthReference | None = None,
                accuracy_weight: float = 0.9, format_weight: float = 0.1, **_: object) -> list[dict[str, float]]:
    """Batch reward function (``worker.reward.reward_function=RL/rewards/vlpo.py:vlpo_reward``)."""
    verdicts, by_api = judge_verdicts(samples, judge, repetition_penalty)
    formats = [boxed_format_reward(s.response) for s in samples]
    penalties = [0.0] * len(samples)
    if length_penalty_weight:
        penalties = group_length_penalties([_prompt_key(s) for s in samples],
                                           [s.response_length for s in samples], [v > 0 for v in verdicts],
                                           length_reference)
    return [{"overall": accuracy_weight * v + format_weight * f - length_penalty_weight * p,
             "accuracy": float(v > 0), "verdict": float(v), "format": f, "length_penalty": p, "api_judged": float(a)}
            for v, f, p, a in zip(verdicts, formats, penalties, by_api)]
