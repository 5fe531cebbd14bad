"""Soft self-consistency reward (EvoLMM, kept by iReasoner): agree with the group's answers, and stay brief.

r_soft,i = p(a_i)^γ · (1 − λ·clip((w_i − τ)/τ, 0, 1)). The empirical answer distribution is also the input of the
proposer's entropy reward, so both come from ``answer_stats``.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

IREASONER_LEN = {"len_penalty": 0.05, "target_words": 64}
EVOLMM_LEN = {"len_penalty": 0.10, "target_words": 6}


@dataclass
class AnswerStats:
    counts: dict[str, int]
    probs: dict[str, float]
    entropy: float  # nats
    majority: str  # ties → first seen


def answer_stats(answers: list[str]) -> AnswerStats:
    """Histogram, probabilities, entropy (nats) and majority of normalised answers."""
    counts = Counter(answers)  # insertion-ordered, so max() keeps the first seen among ties
    n = len(answers)
    probs = {a: c / n for a, c in counts.items()} if n else {}
    entropy = 0.0 - sum(p * math.log(p) for p in probs.values() if p > 0)
    majority = max(counts, key=counts.get) if counts else ""
    return AnswerStats(dict(counts), probs, entropy, majority)


def length_factor(words: int, len_penalty: float, target_words: float) -> float:
    """1 − λ·clip((w − τ)/τ, 0, 1): no penalty up to τ words, at most λ at 2τ and beyond."""
    excess = min(max((words - target_words) / target_words, 0.0), 1.0) if target_words > 0 else 0.0
    return 1.0 - len_penalty * excess


def soft_rewards(answers: list[str], words: list[int], gamma: float = 0.7, len_penalty: float = 0.05,
                 target_words: float = 64) -> list[float]:
    """r_soft for every sample of one group (answers already normalised)."""
    probs = answer_stats(answers).probs
    return [probs[a] ** gamma * length_factor(w, len_penalty, target_words) for a, w in zip(answers, words)]
