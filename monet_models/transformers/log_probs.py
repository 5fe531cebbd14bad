"""Per-position log-likelihoods of a sequence with text tokens and latent steps (docs/design.md, the VLPO objective).

Both use the usual causal shift: the value for position p comes from the model's output at p-1. For a latent
pad that output is the mean that produced z_p (not the position z_p is fed into), so the Gaussian is centred on
the prediction of the step that generated it.
"""
from __future__ import annotations

import math

import torch


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) at `tokens`; logits (..., V) already aligned with tokens (...). fp32."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def latent_log_density(latents: torch.Tensor, means: torch.Tensor, sigma: float, scale_by_dim: bool = False):
    """log N(z; μ, σ²I) per latent up to the σ-free constant −(D/2)·log 2π, in fp32; optionally divided by D.

    The −D·log σ term cancels in every ratio of two densities with the same σ (the PPO ratio), and keeps the
    density a true one when σ is compared across policies. The KL to the reference does not use this one-sample
    log-ratio at latent positions: it takes the exact Gaussian KL from the means (`algorithms.kl.gaussian_kl`).
    """
    diff = latents.float() - means.float()
    dim = diff.shape[-1]
    value = -(diff * diff).sum(-1) / (2.0 * sigma * sigma) - dim * math.log(sigma)
    return value / dim if scale_by_dim else value


def sequence_log_probs(
    logits: torch.Tensor,
    hidden_states: torch.Tensor,
    input_ids: torch.Tensor,
    latent_embeds: torch.Tensor | None,
    latent_pad_id: int,
    temperature: float = 1.0,
    sigma: float = 10.0,
    scale_by_dim: bool = False,
) -> torch.Tensor:
    """Log-likelihood of every position (B, L): token log-probs, Gaussian terms at latent pads, 0 at position 0.

    Aligned with `input_ids` so the same code serves padded batches and packed (1, N) streams; in a packed
    stream the first position of each sequence gets a meaningless value, which is always a prompt position.
    """
    targets = input_ids[:, 1:]
    values = token_log_probs(logits[:, :-1], targets, temperature)
    latent_mask = targets == latent_pad_id
    count = int(latent_mask.sum())
    if count:
        if latent_embeds is None or latent_embeds.shape[0] != count:
            got = 0 if latent_embeds is None else latent_embeds.shape[0]
            raise ValueError(f"{got} latent vectors for {count} latent pads")
        density = latent_log_density(latent_embeds, latent_means(hidden_states, input_ids, latent_pad_id), sigma,
                                     scale_by_dim)
        values = values.masked_scatter(latent_mask, density)
    return torch.nn.functional.pad(values, (1, 0))


def latent_means(hidden_states: torch.Tensor, input_ids: torch.Tensor, latent_pad_id: int) -> torch.Tensor:
    """(latents, D) fp32: the mean μ of each latent pad of `input_ids` (the hidden state one position before it),
    in row-major order of the pads, the order the latents are recorded in."""
    return hidden_states[:, :-1][input_ids[:, 1:] == latent_pad_id].float()
