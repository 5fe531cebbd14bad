"""The critic's clipped value loss (EasyR1/verl `compute_value_loss`), per position so the caller aggregates it."""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .aggregation import masked_mean


def compute_value_loss(values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Per-position ½·max((V − R)², (clip(V, V_old ± c) − R)²) (B, T), zero outside the mask, and its metrics.

    The clipped branch keeps the new value within `cliprange_value` of the value the advantages were computed with
    (PPO's trust region for the critic); taking the larger loss makes the clip pessimistic, so it only ever slows
    the critic down. EasyR1 applies the ½ after averaging; it is the same number. Metrics (EasyR1's names):
    `vf_clipfrac` = share of positions where the clipped branch is the larger, `vpred_mean` = mean new value.
    """
    dtype = torch.promote_types(values.dtype, torch.float32)  # at least fp32 (bf16 critics), fp64 kept
    values, returns, old_values = (x.to(values.device, dtype) for x in (values, returns, old_values))
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss, clipped_loss = (values - returns).square(), (clipped - returns).square()
    loss = 0.5 * torch.maximum(unclipped_loss, clipped_loss)
    loss = torch.where(response_mask.bool(), loss, torch.zeros_like(loss))
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean((unclipped_loss < clipped_loss).float(), response_mask).item(),
                   "vpred_mean": masked_mean(values, response_mask).item()}
    return loss, metrics
