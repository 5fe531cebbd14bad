"""Rewards: the reward-function contract, the manager the reward worker runs, and the built-in reward functions."""
from .interface import RewardFunctionError, RewardInput, load_reward_function
from .manager import RewardManager, RewardResult

__all__ = ["RewardFunctionError", "RewardInput", "RewardManager", "RewardResult", "load_reward_function"]
