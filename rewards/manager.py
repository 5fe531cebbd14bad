"""RewardManager: loads the configured reward function, feeds it the run's judge and context, validates the result.

Built inside the reward worker (a Ray actor): the reward function is loaded at construction so a bad path fails fast,
while the API judge (clients, cache connection, threads) is built on first use, and pickling drops both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .interface import REWARD_TYPES, RewardFunctionError, RewardInput, accepted_kwargs, call_reward_function, \
    load_reward_function, resolve_function_spec
from .length import LengthReference


@dataclass
class RewardResult:
    overall: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class RewardManager:
    """``compute(samples, **context)`` → RewardResult; judge/API faults never raise (they become "no verdict")."""

    def __init__(self, reward_config, judge_config=None, run_dir: str | None = None):
        from rewards.judges import check_judge_credentials

        if reward_config.reward_type not in REWARD_TYPES:
            raise RewardFunctionError(
                f"worker.reward.reward_type={reward_config.reward_type!r}: expected one of {REWARD_TYPES}")
        if judge_config is not None:
            check_judge_credentials(judge_config)
        self.reward_config, self.judge_config, self.run_dir = reward_config, judge_config, run_dir
        self.spec = resolve_function_spec(reward_config.reward_function)
        self.length_reference = LengthReference()
        self._fn = load_reward_function(self.spec)
        self._judge = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fn"], state["_judge"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def fn(self):
        if self._fn is None:
            self._fn = load_reward_function(self.spec)
        return self._fn

    @property
    def judge(self):
        """The API judge, or None for rules only (``worker.rule_based_judge.api_name=''``)."""
        if self._judge is None and self.judge_config is not None and self.judge_config.api_name:
            from rewards.judges import ApiJudge

            self._judge = ApiJudge(self.judge_config, repetition=self.reward_config.repetition_penalty,
                                   run_dir=self.run_dir)
        return self._judge

    def _kwargs(self, context: dict[str, Any]) -> dict[str, Any]:
        offered = {"judge": self.judge, "repetition_penalty": self.reward_config.repetition_penalty,
                   "length_penalty_weight": self.reward_config.length_penalty_weight,
                   "length_reference": self.length_reference, **context,
                   **self.reward_config.reward_function_kwargs}
        return accepted_kwargs(self.fn, offered)

    def compute(self, samples: list[RewardInput], **context: Any) -> RewardResult:
        """Score a batch; ``context`` (e.g. ``step``, ``total_steps``, ``embed_fn``) reaches functions that accept it."""
        if not samples:
            return RewardResult([], {}, {})
        scores = call_reward_function(self.fn, self.spec, self.reward_config.reward_type, samples,
                                      self._kwargs(context))
        names = sorted({k for score in scores for k in score if k != "overall"})
        overall = [score["overall"] for score in scores]
        components = {name: [score.get(name, 0.0) for score in scores] for name in names}
        metrics = {"reward/mean": _mean(overall), "reward/overall": _mean(overall)}
        metrics.update({f"reward/{name}": _mean(values) for name, values in components.items()})
        if self._judge is not None:
            metrics.update(self._judge.metrics(reset=True))
        return RewardResult(overall, components, metrics)

    def state_dict(self) -> dict:
        """What the trainer checkpoints so a resumed run keeps its length references."""
        return {"length_reference": self.length_reference.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.length_reference.load_state_dict(state.get("length_reference", {}))
