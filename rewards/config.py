"""Config sections of the reward worker (`worker.reward`) and the API judge (`worker.rule_based_judge`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewardConfig:
    reward_function: str = "rewards/vlpo.py:vlpo_reward"  # path.py:fn (or package.module:fn)
    reward_function_kwargs: dict[str, Any] = field(default_factory=dict)
    reward_type: str = "batch"  # batch: fn(list of samples) | sequential: fn(one sample)
    repetition_penalty: bool = False  # judge answers 1 / 0 / -1 (incorrect and repetitive)
    length_penalty_weight: float = 0.0


@dataclass
class JudgeConfig:
    api_name: str = ""  # "" = rules only; gemini-* | deepseek-* | any other name = OpenAI-compatible endpoint
    api_base_url: str = ""  # overrides the provider's endpoint (gateways, local servers)
    api_kwargs: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.1, "max_tokens": 1024})
    max_concurrency: int = 16
    requests_per_minute: int = 600
    timeout_s: float = 60.0
    max_retries: int = 4
    retry_backoff_s: float = 1.0  # first retry delay; doubles per attempt (with jitter), at least the server's Retry-After
    use_cache: bool = True  # persistent verdict cache in the run folder
    # A response with no extractable answer (no \boxed{}, no "... is X") goes to the judge whole, latents stripped.
    # true = Monet's behaviour: score it incorrect by rule without asking (cheaper, but misses unboxed answers).
    skip_unextractable: bool = False
