"""Masked reductions and loss aggregation (the single home of `masked_mean` / `masked_whiten`).

Every quantity in the RL step lives in (B, T) tensors whose valid entries are given by the response mask; text
tokens and latent positions are both just "positions" here, so one set of reductions serves both.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Sum of `values` where `mask` is set; `torch.where` so NaN/inf at padded positions cannot leak in."""
    masked = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    weighted = masked * mask.to(values.dtype)
    return weighted.sum() if dim is None else weighted.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean over masked entries (of all, or along `dim`); an empty mask gives 0 instead of NaN."""
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1e-8)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over all masked entries; Bessel-corrected when asked and at least two entries exist."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    count = mask.to(values.dtype).sum()
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries of the whole batch (verl/EasyR1: unbiased var, rsqrt(var + 1e-8)).

    Used by REINFORCE++ so advantages have zero mean and unit scale across the batch's response tokens.
    Values outside the mask are transformed too; callers zero them with the mask.
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + eps)
    return whitened if shift_mean else whitened + mean


def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    global_token_count: Optional[Union[int, float, torch.Tensor]] = None,
    global_seq_count: Optional[Union[int, float, torch.Tensor]] = None,
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar.

    `token-mean`: Σ masked loss / N. N = `global_token_count` when given — the number of response tokens over ALL
    micro-batches and ranks of the mini-batch — so that summing micro-batch losses (gradient accumulation) and
    averaging gradients over ranks (data parallel: pass count / world_size, or scale by world_size) yields exactly the
    global token mean; otherwise N is this mask's count. Latent positions count as one token each.
    `seq-mean-token-mean`: mean over sequences of each sequence's token mean (every sequence weighs the same).
    `seq-mean-token-sum`: mean over sequences of each sequence's token sum (Dr.GRPO-style, no length bias).
    For the seq modes the divisor is `global_seq_count` when given, else the number of sequences here that have
    at least one masked token; `global_token_count` does not apply to them.
    """
    if mode == "token-mean":
        denom = mask.to(loss.dtype).sum() if global_token_count is None else global_token_count
        denom = torch.as_tensor(denom, dtype=loss.dtype, device=loss.device)
        return masked_sum(loss, mask) / denom.clamp(min=1e-8)
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        per_seq = masked_mean(loss, mask, dim=-1) if mode == "seq-mean-token-mean" else masked_sum(loss, mask, dim=-1)
        if global_seq_count is None:
            denom = (mask.to(loss.dtype).sum(-1) > 0).to(loss.dtype).sum()
        else:
            denom = torch.as_tensor(global_seq_count, dtype=loss.dtype, device=loss.device)
        return per_seq.sum() / denom.clamp(min=1e-8)
    raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {', '.join(LOSS_AGG_MODES)}")
