"""VLPO reward as a file you can copy: ``worker.reward.reward_function=examples/reward_function/vlpo_reward.py:compute_score``.

It delegates to the built-in ``rewards.vlpo.vlpo_reward`` (0.9·accuracy + 0.1·format − w·length penalty; rules
first, the API judge for rule negatives). Edit the weights here, or wrap the result, to make your own variant.
"""
from rewards.vlpo import vlpo_reward


def compute_score(samples, judge=None, repetition_penalty=False, length_penalty_weight=0.0, length_reference=None,
                  accuracy_weight=0.9, format_weight=0.1):
    """Batch reward function (``worker.reward.reward_type=batch``): one dict with ``overall`` per sample."""
    return vlpo_reward(samples, judge=judge, repetition_penalty=repetition_penalty,
                       length_penalty_weight=length_penalty_weight, length_reference=length_reference,
                       accuracy_weight=accuracy_weight, format_weight=format_weight)
