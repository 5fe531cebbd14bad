"""Length penalty against a per-prompt reference length (Monet's term, with its look-up-before-record bug fixed).

penalty = max(0, length − ref_len) tokens, ref_len = the shortest correct response seen for the prompt, else the running
mean length of its responses, else 0 (no penalty). The current group is recorded *before* the look-up, so the penalty
is active from the first epoch (Monet looked up first, so with one epoch ref_len was always 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field


def length_penalty(length: int, ref_len: float) -> float:
    """Tokens beyond the reference length; 0 when there is no reference."""
    return max(0.0, float(length) - float(ref_len)) if ref_len > 0 else 0.0


@dataclass
class _PromptStats:
    min_correct: float = 0.0
    total: float = 0.0
    count: int = 0


@dataclass
class LengthReference:
    """Per-prompt length statistics; ``state_dict`` lets the trainer checkpoint it with the run."""

    stats: dict[str, _PromptStats] = field(default_factory=dict)

    def record(self, key: str, length: int, correct: bool) -> None:
        s = self.stats.setdefault(key, _PromptStats())
        s.total += length
        s.count += 1
        if correct and (s.min_correct == 0 or length < s.min_correct):
            s.min_correct = float(length)

    def ref_len(self, key: str) -> float:
        s = self.stats.get(key)
        if s is None or s.count == 0:
            return 0.0
        return s.min_correct if s.min_correct > 0 else s.total / s.count

    def state_dict(self) -> dict:
        return {k: [s.min_correct, s.total, s.count] for k, s in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {k: _PromptStats(float(a), float(b), int(c)) for k, (a, b, c) in state.items()}


def group_length_penalties(keys: list[str], lengths: list[int], correct: list[bool],
                           reference: LengthReference | None = None) -> list[float]:
    """Record every sample, then penalise each against its prompt's reference (a fresh one when none is given)."""
    reference = reference if reference is not None else LengthReference()
    for key, length, ok in zip(keys, lengths, correct):
        reference.record(key, length, ok)
    return [length_penalty(length, reference.ref_len(key)) for key, length in zip(keys, lengths)]
