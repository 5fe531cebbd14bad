"""PPO-family policy losses (EasyR1's `worker.actor.loss_type`): `default` (clip-higher and dual clip, DAPO / EasyR1),
`gspo` and `gspo_token` (a sequence-level ratio), `cispo` (clipped importance weight on REINFORCE) and `sapo` (soft
sigmoid gates instead of a hard clip).

Latent positions need nothing special: their log-probs are Gaussian log-densities −‖z − μ_θ‖²/(2σ²) stored in the
same (B, T) tensors, so exp(logp − old_logp) is the density ratio of the latent step and is clipped like a token's.
The sequence-level ratio of `gspo` averages those log-ratios over a sequence's positions, where a latent step's is
a sum over D dimensions; the config refuses it unless `worker.actor.latent_logprob_scale=dim` (RL/config/checks.py).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from .aggregation import masked_mean

LOG_RATIO_CLAMP = 20.0
LOSS_TYPES = ("default", "gspo", "gspo_token", "cispo", "sapo")


def compute_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.3,
    clip_ratio_dual: float = 3.0,
    loss_type: str = "default",
    tau_positive: float = 1.0,
    tau_negative: float = 1.05,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Per-token policy loss (B, T), zero outside the mask, plus masked-mean metrics.

    `default`: r = exp(clamp(logp − old_logp, ±20)) (clamped so a large log-ratio cannot overflow to inf/NaN
    gradients); pg = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)): the pessimistic bound keeps the update inside the
    trust region, and a larger ε_high (clip-higher) leaves room to raise low-probability tokens, which fights entropy
    collapse; where A < 0, pg = min(pg, −A·c_dual): dual clip caps the loss of a negative-advantage token whose ratio
    exploded, so one stale token cannot dominate the batch. Clipped regions have zero gradient.
    `gspo`: the same clip on the sequence's ratio exp(mean_t log r_t) at every position (one trust region per
    answer); `gspo_token`: its value with each token's own gradient. `cispo`: −A·clip(r)·logp with the clipped
    ratio detached (every token keeps a gradient). `sapo`: −A·(4/τ)·sigmoid(τ·(r − 1)), τ = `tau_positive` where
    A ≥ 0 and `tau_negative` where A < 0 (a smooth trust region).

    Metrics (EasyR1 names): `pg_clipfrac_higher` = share of tokens where the ε-clip is active (or for cispo where
    the ratio was clipped), `pg_clipfrac_lower` = share where the dual clip is active, `ppo_kl` = masked mean of
    old_logp − logp.
    """
    if clip_ratio_dual <= 1.0:
        raise ValueError(f"clip_ratio_dual must be > 1, got {clip_ratio_dual}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r} (worker.actor.loss_type); choose one of {', '.join(LOSS_TYPES)}")
    token_log_ratio = log_probs - old_log_probs
    log_ratio = _importance_log_ratio(token_log_ratio, log_probs, response_mask, loss_type)
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    clipped_ratio = torch.exp(torch.clamp(log_ratio, math.log(1.0 - clip_ratio_low), math.log(1.0 + clip_ratio_high)))
    metrics = {}
    if loss_type == "cispo":
        loss = -advantages * log_probs * clipped_ratio.detach()
        metrics["pg_clipfrac_higher"] = masked_mean((clipped_ratio != ratio).float(), response_mask).item()
    elif loss_type == "sapo":
        tau = torch.where(advantages >= 0, torch.full_like(ratio, tau_positive), torch.full_like(ratio, tau_negative))
        loss = -advantages * 4.0 / tau * torch.sigmoid(tau * (ratio - 1.0))
    else:
        loss, metrics = _clipped(advantages, ratio, clipped_ratio, clip_ratio_dual, response_mask)
    loss = torch.where(response_mask.bool(), loss, torch.zeros_like(loss))
    metrics["ppo_kl"] = masked_mean(-torch.clamp(token_log_ratio.detach(), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP),
                                    response_mask).item()
    return loss, metrics


def _importance_log_ratio(token_log_ratio, log_probs, response_mask, loss_type: str) -> torch.Tensor:
    """log r per position: the token's own, or GSPO's sequence mean (with or without each token's gradient)."""
    if loss_type not in ("gspo", "gspo_token"):
        return token_log_ratio
    sequence = masked_mean(token_log_ratio, response_mask, dim=-1).unsqueeze(-1)
    if loss_type == "gspo_token":
        return sequence.detach() + log_probs - log_probs.detach()
    return sequence * response_mask.to(sequence.dtype)


def _clipped(advantages, ratio, clipped_ratio, clip_ratio_dual, response_mask):
    pg_loss = -advantages * ratio
    pg_loss_clip = -advantages * clipped_ratio
    pg_loss_dual = -advantages * clip_ratio_dual
    clipped_higher = torch.maximum(pg_loss, pg_loss_clip)
    clipped_lower = torch.minimum(clipped_higher, pg_loss_dual)
    negative = advantages < 0
    loss = torch.where(negative, clipped_lower, clipped_higher)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac_higher": masked_mean((pg_loss < pg_loss_clip).float(), response_mask).item(),
            "pg_clipfrac_lower": masked_mean((negative & (clipped_higher > pg_loss_dual)).float(), response_mask).item(),
        }
    return loss, metrics
