"""Monet's VLPO reward: overall = 0.9·accuracy + 0.1·format − length_penalty_weight·length_penalty.

Correctness is judged by rules first; only rule negatives go to the API judge (when one is configured), whose verdict
replaces the rule result unless it is "no verdict". A response with no extractable answer goes to the judge whole
(latents stripped), unless `worker.rule_based_judge.skip_unextractable` keeps Monet's "empty prediction = incorrect,
no call". In repetition mode the verdict may be −1 (incorrect and looping), which makes the accuracy term negative.
Components: ``accuracy`` (1/0, fraction correct), ``verdict`` (1/0/−1, the value in the reward), ``format``,
``length_penalty`` (tokens), ``api_judged`` (1 when the API's verdict decided), ``api_no_verdict`` (1 when the API was
asked and gave none, so the rule verdict stands) and ``unextractable`` (1 when the rules found no answer).
"""
from __future__ import annotations

import hashlib

from .accuracy import rule_accuracy
from .answer import extract_answer, judge_prediction
from .format_reward import boxed_format_reward
from .interface import RewardInput
from .judgement import Judgement, judge_rule_negatives
from .length import LengthReference, group_length_penalties


def _question(sample: RewardInput) -> str:
    for key in ("question", "problem"):
        if isinstance(sample.extra.get(key), str) and sample.extra[key].strip():
            return sample.extra[key]
    return sample.prompt


def _prompt_key(sample: RewardInput) -> str:
    return hashlib.sha1(f"{sample.prompt}\x00{sample.ground_truth}".encode()).hexdigest()


def _skips_unextractable(judge) -> bool:
    return bool(getattr(getattr(judge, "config", None), "skip_unextractable", False))


def judge_responses(items: list[tuple[str, str, str]], judge=None, repetition: bool = False) -> list[Judgement]:
    """Judge (question, response, ground truth) triples: rules, then rule negatives to the API judge (if any)."""
    judged = [Judgement(int(rule_accuracy(response, truth)), not extract_answer(response))
              for _, response, truth in items]
    skip = _skips_unextractable(judge)
    asks = [None if skip and j.unextractable else (question, judge_prediction(response, repetition), truth)
            for j, (question, response, truth) in zip(judged, items)]
    return judge_rule_negatives(judged, asks, judge)


def vlpo_reward(samples: list[RewardInput], judge=None, repetition_penalty: bool = False,
                length_penalty_weight: float = 0.0, length_reference: LengthReference | None = None,
                accuracy_weight: float = 0.9, format_weight: float = 0.1, **_: object) -> list[dict[str, float]]:
    """Batch reward function (``worker.reward.reward_function=rewards/vlpo.py:vlpo_reward``)."""
    judged = judge_responses([(_question(s), s.response, str(s.ground_truth)) for s in samples], judge,
                             repetition_penalty)
    verdicts = [j.verdict for j in judged]
    formats = [boxed_format_reward(s.response) for s in samples]
    penalties = [0.0] * len(samples)
    if length_penalty_weight:
        penalties = group_length_penalties([_prompt_key(s) for s in samples],
                                           [s.response_length for s in samples], [v > 0 for v in verdicts],
                                           length_reference)
    return [{"overall": accuracy_weight * v + format_weight * f - length_penalty_weight * p,
             "accuracy": float(v > 0), "verdict": float(v), "format": f, "length_penalty": p,
             "api_judged": float(j.api_verdict is not None), "api_no_verdict": float(j.asked and j.api_verdict is None),
             "unextractable": float(j.unextractable)}
            for v, f, p, j in zip(verdicts, formats, penalties, judged)]
