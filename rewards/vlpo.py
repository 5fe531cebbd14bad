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
import logging
from dataclasses import dataclass

from .accuracy import rule_accuracy
from .answer import extract_answer, judge_prediction
from .format_reward import boxed_format_reward
from .interface import RewardInput
from .length import LengthReference, group_length_penalties

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judgement:
    """How one response was judged: the rule verdict, then the API's outcome when it was asked."""

    rule: int
    unextractable: bool = False  # the rules found no answer in the response
    asked: bool = False  # sent to the API judge
    api_verdict: int | None = None  # None: not asked, or asked without a verdict
    api_source: str = ""  # "api" | "cache" when asked

    @property
    def verdict(self) -> int:
        """The verdict in the reward: the API's when it gave one, else the rule's."""
        return self.rule if self.api_verdict is None else self.api_verdict


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
    from rewards.judges import JudgeRequest

    judged = [Judgement(int(rule_accuracy(response, truth)), not extract_answer(response))
              for _, response, truth in items]
    if judge is None:
        return judged
    skip = _skips_unextractable(judge)
    predictions = {i: judge_prediction(items[i][1], repetition) for i, j in enumerate(judged)
                   if j.rule == 0 and not (skip and j.unextractable)}
    ask = [i for i, prediction in predictions.items() if prediction]  # an empty response has nothing to judge
    if not ask:
        return judged
    requests = [JudgeRequest(items[i][0], predictions[i], items[i][2]) for i in ask]
    try:
        outcomes = judge.judge(requests)
    except Exception as exc:  # noqa: BLE001 - the judge is a fallback: its failure is "no verdict" for all asked
        logger.warning("API judge failed (%s); keeping rule verdicts", type(exc).__name__)
        outcomes = [None] * len(ask)
    for i, outcome in zip(ask, outcomes):
        verdict = None if outcome is None or outcome.source == "skip" else outcome.verdict
        source = "api" if outcome is None else outcome.source
        judged[i] = Judgement(judged[i].rule, judged[i].unextractable, True, verdict, source)
    return judged


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
