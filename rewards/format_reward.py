"""Format reward: did the model put its final answer in ``\\boxed{...}`` (Monet's 0.1-weighted term)."""
from __future__ import annotations

from .answer import last_boxed, strip_latents


def boxed_format_reward(response: str) -> float:
    """1.0 when the response contains a complete (brace-balanced) ``\\boxed{...}``, else 0.0: the same box the rule
    grader reads its answer from."""
    return 0.0 if last_boxed(strip_latents(response)) is None else 1.0
