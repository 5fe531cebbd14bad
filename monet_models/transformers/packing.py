"""Padding-free packing: a padded batch becomes one (1, N) stream whose attention stays within each sequence.

transformers builds the block-causal mask from a 4th position row holding per-sequence text positions (it
works with sdpa and flash-attn alike); the 3 mRoPE rows are the padded batch's positions, gathered.
Image features and latent vectors keep their order, since packing preserves row-major token order.
"""
from __future__ import annotations

import torch


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, mrope_positions: torch.Tensor):
    """Return (packed_ids (1, N), position_ids (4, 1, N), keep (B, L) bool) from a padded batch."""
    keep = attention_mask.bool()
    text_positions = (attention_mask.long().cumsum(-1) - 1)[keep]
    position_ids = torch.cat([text_positions[None, None], mrope_positions[:, keep][:, None]], dim=0)
    return input_ids[keep][None], position_ids, keep


def unpack(values: torch.Tensor, keep: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Scatter a packed (1, N, ...) tensor back to the padded (B, L, ...) layout."""
    out = values.new_full((*keep.shape, *values.shape[2:]), fill)
    out[keep] = values[0]
    return out
