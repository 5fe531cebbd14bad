"""Proposer reward (iReasoner/EvoLMM): a Gaussian band-pass on the solver answers' entropy.

Questions every solver sample agrees on (H = 0) are too easy and all-different answers (H = ln N) unanswerable; the
reward peaks at moderate disagreement, H = μ.
"""
from __future__ import annotations

import math

from .self_consistency import answer_stats


def entropy_band_pass(entropy: float, mu: float = 0.90, sigma: float = 0.35) -> float:
    return math.exp(-((entropy - mu) ** 2) / (2 * sigma**2))


def proposer_reward(normalized_answers: list[str], mu: float = 0.90, sigma: float = 0.35) -> dict[str, float]:
    """``{"overall": r_prop, "entropy": H}`` for one proposed question, from its solvers' normalised answers."""
    entropy = answer_stats(normalized_answers).entropy
    return {"overall": entropy_band_pass(entropy, mu, sigma), "entropy": entropy}
