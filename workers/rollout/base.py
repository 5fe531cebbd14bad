"""The rollout engine interface shared by every backend (native transformers, vLLM).

The Ray rollout worker only sees `RolloutEngine.generate`: prompts in, one `RolloutSample` per (prompt, sample) out,
prompt-major. Samples carry everything training needs to re-score them exactly (token log-probs at the rollout
temperature, the latent vectors that were actually fed, where the latent blocks are), so no side channel is needed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch

from monet_models.latent_tokens import default_latent_size

Strategy = Literal["greedy", "sample", "monet"]
STRATEGIES = ("greedy", "sample", "monet")


@dataclass
class SamplingParams:
    """How to sample. `monet` samples like `sample` but lets `<abs_vis_token>` open latent blocks of K steps.

    Recorded log-probs are always those of the unmodified logits at `temperature` (what the training forward
    computes); `top_p`, `top_k`, `repetition_penalty`, `logit_bias` and the never-sampled mask only shape sampling.
    `logit_bias` (token id -> additive bias) also serves tests and benchmarks that need blocks to open often.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # <= 0: off
    max_new_tokens: int = 512
    strategy: Strategy = "sample"
    latent_size: int = field(default_factory=default_latent_size)
    latent_noise_std: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    ignore_eos: bool = False  # stop tokens do not end a sequence (benchmarks: every sample runs to max_new_tokens)
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides the tokenizer's / generation config's EOS
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.n < 1 or self.max_new_tokens < 1 or self.latent_size < 1:
            raise ValueError("n, max_new_tokens and latent_size must be positive")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.latent_noise_std < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, latent_noise_std >= 0")
        if self.strategy != "greedy" and self.temperature == 0:
            raise ValueError(f"temperature 0 is only meaningful with strategy 'greedy', got {self.strategy!r}")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be positive")

    @property
    def uses_latents(self) -> bool:
        return self.strategy == "monet"

    @property
    def log_prob_temperature(self) -> float:
        """Temperature of the recorded log-probs (greedy with T=0 records plain log-softmax)."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class PromptInput:
    """One prompt: unpadded 1-D ids with image placeholders already expanded, and that prompt's images."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None  # (num_patches, patch_dim) for this prompt's images
    image_grid_thw: torch.Tensor | None = None  # (num_images, 3)

    @property
    def has_images(self) -> bool:
        return self.image_grid_thw is not None and self.image_grid_thw.numel() > 0


@dataclass
class RolloutSample:
    """One response. Positions index the response (0 = first generated token).

    `response_mask` is 1 where the position is a policy decision (sampled text tokens and latent steps of complete
    blocks), 0 at forced `</abs_vis_token>` positions and at the latent steps of a block cut open by the length limit.
    `token_log_probs` is 0 at forced and latent positions. `latents` (num_latents, D) fp32 are the vectors that
    were fed at the `<abs_vis_token_pad>` positions, in order (noise included), or None without latents.
    """

    prompt_index: int
    sample_index: int
    response_ids: torch.Tensor  # (T,) long
    response_mask: torch.Tensor  # (T,) long
    token_log_probs: torch.Tensor  # (T,) fp32
    latents: torch.Tensor | None
    block_positions: list[tuple[int, int]]  # (index s of <abs_vis_token>, latents recorded at s+1 ... s+num_latents)
    truncated_block: bool
    finish_reason: Literal["eos", "length"]

    @property
    def num_latents(self) -> int:
        return 0 if self.latents is None else int(self.latents.shape[0])


class RolloutEngine(ABC):
    """Generates n samples per prompt; outputs are ordered prompt-major (prompt 0's n samples first)."""

    @abstractmethod
    def generate(self, prompts: list[PromptInput], params: SamplingParams) -> list[RolloutSample]:
        ...
