"""PPO clipped policy loss with clip-higher and dual clip (DAPO / EasyR1 `default`).

Latent positions need nothing special: their log-probs are Gaussian log-densities −‖z − μ_θ‖²/(2σ²) stored in the
same (B, T) tensors, so exp(logp − old_logp) is the density ratio of the latent step and is clipped like a token's.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from .aggregation import masked_mean

LOG_RATIO_CLAMP = 20.0


def compute_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.3,
    clip_ratio_dual: float = 3.0,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Per-token PPO loss (B, T), zero outside the mask, plus masked-mean metrics.

    r = exp(clamp(logp − old_logp, ±20)) (clamped so a large log-ratio cannot overflow to inf/NaN gradients);
    pg = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)): the pessimistic bound keeps the update inside the trust region,
    and a larger ε_high (clip-higher) leaves room to raise low-probability tokens, which fights entropy collapse;
    where A < 0, pg = min(pg, −A·c_dual): dual clip caps the loss of a negative-advantage token whose ratio exploded,
    so one stale token cannot dominate the batch. Clipped regions have zero gradient.

    Metrics (EasyR1 names): `pg_clipfrac_higher` = share of tokens where the ε-clip is active, `pg_clipfrac_lower` =
    share where the dual clip is active, `ppo_kl` = masked mean of old_logp − logp.
    """
    if clip_ratio_dual <= 1.0:
        raise ValueError(f"clip_ratio_dual must be > 1, got {clip_ratio_dual}")
    log_ratio = torch.clamp(log_probs - old_log_probs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.exp(torch.clamp(log_ratio, math.log(1.0 - clip_ratio_low), math.log(1.0 + clip_ratio_high)))

    pg_loss = -advantages * ratio
    pg_loss_clip = -advantages * clipped_ratio
    pg_loss_dual = -advantages * clip_ratio_dual
    clipped_higher = torch.maximum(pg_loss, pg_loss_clip)
    clipped_lower = torch.minimum(clipped_higher, pg_loss_dual)
    negative = advantages < 0
    loss = torch.where(negative, clipped_lower, clipped_higher)
    loss = torch.where(response_mask.bool(), loss, torch.zeros_like(loss))

    with torch.no_grad():
        metrics = {
            "pg_clipfrac_higher": masked_mean((pg_loss < pg_loss_clip).float(), response_mask).item(),
            "pg_clipfrac_lower": masked_mean((negative & (clipped_higher > pg_loss_dual)).float(), response_mask).item(),
            "ppo_kl": masked_mean(-log_ratio, response_mask).item(),
        }
    return loss, metrics
