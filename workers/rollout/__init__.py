"""Rollout engines: generate interleaved text and latent reasoning for the VLPO trainers."""
from workers.rollout.base import PromptInput, RolloutEngine, RolloutSample, SamplingParams
from workers.rollout.latent_state import LatentLayout, LatentStates, LatentStep
from workers.rollout.native import NativeRolloutEngine
from workers.rollout.prompt_inputs import prompt_inputs_from_batch

__all__ = [
    "PromptInput", "RolloutEngine", "RolloutSample", "SamplingParams", "LatentLayout", "LatentStates", "LatentStep",
    "NativeRolloutEngine", "prompt_inputs_from_batch",
]
