"""A minimal custom reward: rule accuracy minus a linear penalty beyond a token budget.

Use with ``worker.reward.reward_type=sequential``
``worker.reward.reward_function=examples/reward_function/length_penalty_example.py:compute_score``
``worker.reward.reward_function_kwargs='{budget: 512, weight: 0.001}'``. It receives one ``RewardInput`` at a time
(prompt, response, ground_truth, response_length, extra, group_id) and returns ``overall`` plus named components.
"""
from rewards.accuracy import rule_accuracy


def compute_score(sample, budget: int = 512, weight: float = 0.001):
    accuracy = rule_accuracy(sample.response, sample.ground_truth)
    over_budget = max(0, sample.response_length - budget)
    return {"overall": accuracy - weight * over_budget, "accuracy": accuracy, "over_budget": float(over_budget)}
