"""The rollout engine interface shared by every backend (native transformers, vLLM).

The Ray rollout worker only sees `RolloutEngine.generate`: prompts in, one `RolloutSample` per (prompt, sample) out,
prompt-major. Samples carry everything training needs to re-score them exactly (token log-probs at the rollout
temperature, the latent vectors that were actually fed, where the latent blocks are), so no side channel is needed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Mapping, Union

import torch

from monet_models.latent_tokens import default_latent_size

Strategy = Literal["greedy", "sample", "monet"]
STRATEGIES = ("greedy", "sample", "monet")
# What an ablation feeds at `<abs_vis_token_pad>` instead of the previous hidden state h: nothing else changes.
LatentOverride = Literal["none", "zero", "noise", "given"]
LATENT_OVERRIDES = ("none", "zero", "noise", "given")


@dataclass
class SamplingParams:
    """How to sample. `monet` samples like `sample` but lets `<abs_vis_token>` open latent blocks of K steps;
    `monet` with temperature 0 chooses text greedily but still opens blocks (evaluation, exact engine comparisons).

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
    latent_noise_relative: bool = False  # noise std in units of each hidden state's RMS (real models are far from 1)
    seed: int | None = None  # request i (= prompt * n + sample) draws its latent noise from request_seed(seed, i)
    repetition_penalty: float = 1.0
    ignore_eos: bool = False  # stop tokens do not end a sequence (benchmarks: every sample runs to max_new_tokens)
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides the tokenizer's / generation config's EOS
    logit_bias: dict[int, float] | None = None
    # Latent ablations (evaluation): "zero" feeds 0, "noise" a Gaussian vector with the norm of h (drawn per request
    # from request_seed(seed, i)), "given" request i's `given_latents[i]` ((m, D), fed in order, cycling when the
    # request places more than m). The vectors fed are what `RolloutSample.latents` records. Native engine only.
    latent_override: LatentOverride = "none"
    given_latents: tuple[torch.Tensor | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.n < 1 or self.max_new_tokens < 1 or self.latent_size < 1:
            raise ValueError("n, max_new_tokens and latent_size must be positive")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.latent_noise_std < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, latent_noise_std >= 0")
        if self.strategy == "sample" and self.temperature == 0:
            raise ValueError("temperature 0 with strategy 'sample' is greedy decoding: use strategy 'greedy'")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be positive")
        self._check_override()

    def _check_override(self) -> None:
        if self.latent_override not in LATENT_OVERRIDES:
            raise ValueError(f"latent_override must be one of {LATENT_OVERRIDES}, got {self.latent_override!r}")
        if (self.latent_override == "given") != (self.given_latents is not None):
            raise ValueError("given_latents goes with latent_override='given' (one entry per request), and only there")
        if self.latent_override != "none" and (self.strategy != "monet" or self.latent_noise_std > 0):
            raise ValueError(f"latent_override={self.latent_override!r} replaces the latents of strategy 'monet' "
                             f"and excludes latent_noise_std (got strategy {self.strategy!r}, noise "
                             f"{self.latent_noise_std})")

    @property
    def uses_latents(self) -> bool:
        return self.strategy == "monet"

    @property
    def greedy_text(self) -> bool:
        return self.strategy == "greedy" or self.temperature == 0

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


Weights = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def weights_items(weights: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a state dict or of an iterable of pairs."""
    return iter(weights.items()) if isinstance(weights, Mapping) else iter(weights)


WAKE_TAGS = ("weights", "kv_cache")  # what `RolloutEngine.wake_up` restores, in the order it restores them


class RolloutEngine(ABC):
    """Generates n samples per prompt; outputs are ordered prompt-major (prompt 0's n samples first).

    A colocated engine shares its device with the actor, so it holds memory only while it generates (EasyR1's
    hybrid engine). The worker drives it per generation phase: `wake_up(["weights"])` → `update_weights` /
    `update_adapter` when the actor changed → `wake_up(["kv_cache"])` → `generate` ... → `sleep()`; the engine is put
    to sleep right after it is built, so the actor's optimizer state never competes with the KV cache.
    """

    latent_overrides: tuple[str, ...] = ("none",)  # the `SamplingParams.latent_override` values it implements

    @abstractmethod
    def generate(self, prompts: list[PromptInput], params: SamplingParams, lora: str | None = None
                 ) -> list[RolloutSample]:
        """`lora` names an adapter the engine serves (e.g. "solver", "proposer"); None = the base weights.
        Raises RuntimeError while the KV cache (or the weights) sleep."""

    @abstractmethod
    def update_weights(self, weights: Weights) -> None:
        """Replace weights in place, by Hugging Face (transformers) parameter name. `weights` is an iterable of
        (name, tensor) pairs, typically a generator that gathers one parameter (or bucket) at a time: the engine
        consumes it once, to the end, in memory (no file, never the whole model a second time). Tensors arrive cast
        to the engine's dtype, each valid only until the next one is drawn (it may be a view of a shared bucket that
        the next gather overwrites): an engine that keeps one copies it. A Mapping also works (`weights_items`). The
        native engine takes any subset; vLLM
        needs every tensor of each layer it updates, so send the full model."""

    @abstractmethod
    def update_adapter(self, name: str, tensors: Mapping[str, torch.Tensor], config) -> None:
        """Serve LoRA adapter `name` with `tensors` in peft's saved naming (`base_model.model.<module>.lora_A.weight`)
        and `config` (a peft LoraConfig), in memory (no folder); later `generate(..., lora=name)` uses it. Called
        again, it replaces it."""

    @abstractmethod
    def sleep(self) -> None:
        """Give the engine's memory back until `wake_up`: its KV cache (freed) and, where the backend can, its
        weights (vLLM on GPU: sleep mode level 1 moves them to host memory). Idempotent."""

    @abstractmethod
    def wake_up(self, tags: Iterable[str] = WAKE_TAGS) -> None:
        """Undo `sleep` for `tags` (a subset of WAKE_TAGS), weights before the KV cache: the trainer syncs weights
        in between, so the KV cache is not yet allocated while two copies of a tensor may exist. Idempotent."""


def wake_order(tags: Iterable[str]) -> list[str]:
    """`tags` in the order they wake (weights first); an unknown tag is refused by name."""
    tags = [tags] if isinstance(tags, str) else list(tags)
    unknown = sorted(set(tags) - set(WAKE_TAGS))
    if unknown:
        raise ValueError(f"wake_up: unknown tags {unknown}; known: {', '.join(WAKE_TAGS)}")
    return [tag for tag in WAKE_TAGS if tag in tags]


def check_latent_override(engine: RolloutEngine, params: SamplingParams) -> None:
    """Refuse an override the engine would not apply (an ablation that silently fed h would report no effect)."""
    if params.latent_override not in engine.latent_overrides:
        raise NotImplementedError(f"latent_override={params.latent_override!r}: the {type(engine).__name__} does not "
                                  f"implement it (only {', '.join(engine.latent_overrides)}); use the native engine")
