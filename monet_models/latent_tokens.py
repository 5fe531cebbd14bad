"""The latent token layout: one source of truth for the three latent tokens and their ids.

Ids are always looked up by string in the tokenizer (checkpoints disagree on them), never hard-coded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

LATENT_START = "<abs_vis_token>"
LATENT_PAD = "<abs_vis_token_pad>"
LATENT_END = "</abs_vis_token>"
LATENT_TOKENS = (LATENT_START, LATENT_PAD, LATENT_END)


def default_latent_size() -> int:
    """K, the number of latent steps in a block: `LATENT_SIZE` from the environment, else 10."""
    value = os.environ.get("LATENT_SIZE", "10")
    try:
        size = int(value)
    except ValueError as error:
        raise ValueError(f"LATENT_SIZE must be a positive integer, got {value!r}") from error
    if size < 1:
        raise ValueError(f"LATENT_SIZE must be a positive integer, got {size}")
    return size


@dataclass(frozen=True)
class LatentTokens:
    """Token ids of the latent layout and of the tokens that must never be sampled."""

    start: int
    pad: int
    end: int
    image_pad: int
    video_pad: int
    vision_start: int
    vision_end: int
    eos: int
    pad_token: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "LatentTokens":
        def lookup(token: str) -> int:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
                raise KeyError(f"tokenizer has no token {token!r}; call monet_models.add_latent_tokens first")
            return int(token_id)

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(
            start=lookup(LATENT_START),
            pad=lookup(LATENT_PAD),
            end=lookup(LATENT_END),
            image_pad=lookup("<|image_pad|>"),
            video_pad=lookup("<|video_pad|>"),
            vision_start=lookup("<|vision_start|>"),
            vision_end=lookup("<|vision_end|>"),
            eos=int(tokenizer.eos_token_id),
            pad_token=int(pad_id),
        )

    @property
    def never_sampled(self) -> tuple[int, ...]:
        """Ids the policy may never emit: image/video placeholders, vision brackets and the latent pad."""
        return (self.image_pad, self.video_pad, self.vision_start, self.vision_end, self.pad)


def noise_scale(hidden, std: float, relative: bool):
    """σ_x of z = h + σ_x·ε for each latent: `std`, or `std` times each hidden state's RMS with `relative`.

    A real model's final-norm hidden states are far from unit scale, so an absolute σ_x is either negligible or
    swamps the latent; relative to the RMS it means "this fraction of the vector's own size". `hidden` is (rows, D).
    """
    if not relative:
        return std
    return std * hidden.float().pow(2).mean(-1, keepdim=True).sqrt()


def add_latent_tokens(tokenizer, model=None) -> int:
    """Add the missing latent tokens to `tokenizer` (and resize `model`'s embeddings); return how many were added.

    New embedding rows are initialised to the mean of the existing ones, so the tokens start in-distribution.
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in LATENT_TOKENS if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if model is not None:
        needed = len(tokenizer)
        if model.get_input_embeddings().weight.shape[0] < needed:
            model.resize_token_embeddings(needed, mean_resizing=True)
    return len(missing)
