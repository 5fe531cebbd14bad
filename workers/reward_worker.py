"""The reward role: a CPU Ray actor running the reward function, so judging overlaps the log-prob passes."""
from __future__ import annotations

from rewards.ireasoner import judge_answers
from rewards.manager import RewardManager


class RewardWorker:
    def __init__(self, reward_config, judge_config, run_dir: str):
        self.manager = RewardManager(reward_config, judge_config, run_dir=run_dir)

    def compute(self, samples, **context):
        return self.manager.compute(samples, **context)

    def judge_answers(self, questions: list[str], predictions: list[str], truths: list[str]) -> list[int]:
        """Verdicts of already extracted answers (self-evolution validation): rules, then the API judge."""
        return judge_answers(questions, predictions, truths, self.manager.judge)

    def state_dict(self) -> dict:
        return self.manager.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.manager.load_state_dict(state)
