"""Rules first, then the API judge for the rule negatives: the one place where a rule verdict and the judge's meet.

VLPO's reward, the self-evolution majority check and the evaluation all get their verdicts here, so a judge failure
means the same everywhere: an exception from the judge, a missing outcome or a "skip" is "no verdict", and the rule
verdict stands (no verdict is never "incorrect" by itself).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from rewards.judges import JudgeRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judgement:
    """How one answer was judged: the rule verdict, then the API's outcome when it was asked."""

    rule: int
    unextractable: bool = False  # the rules found no answer in the response
    asked: bool = False  # sent to the API judge
    api_verdict: int | None = None  # None: not asked, or asked without a verdict
    api_source: str = ""  # "api" | "cache" when asked

    @property
    def verdict(self) -> int:
        """The verdict in the reward: the API's when it gave one, else the rule's."""
        return self.rule if self.api_verdict is None else self.api_verdict


def judge_rule_negatives(judged: list[Judgement], asks: list[tuple[str, str, str] | None],
                         judge=None) -> list[Judgement]:
    """`judged` with the API judge's outcome for each rule negative whose (question, prediction, ground truth) is in
    `asks` (None: not to be asked); an empty prediction has nothing to judge. Without a judge, the rule verdicts."""
    ask = [i for i, j in enumerate(judged) if judge is not None and j.rule == 0 and asks[i] and asks[i][1].strip()]
    if not ask:
        return judged
    try:
        outcomes = judge.judge([JudgeRequest(*asks[i]) for i in ask])
    except Exception as exc:  # noqa: BLE001 - the judge is a fallback: its failure is "no verdict" for all asked
        logger.warning("API judge failed (%s); keeping rule verdicts", type(exc).__name__)
        outcomes = [None] * len(ask)
    judged = list(judged)
    for i, outcome in zip(ask, outcomes):
        verdict = None if outcome is None or outcome.source == "skip" else outcome.verdict
        judged[i] = replace(judged[i], asked=True, api_verdict=verdict,
                            api_source="api" if outcome is None else outcome.source)
    return judged
