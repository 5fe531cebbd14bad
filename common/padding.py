"""Stacking 1-D rows of different lengths into one (B, width) tensor, and the masks of their real positions.

Prompts are padded on the LEFT, so every prompt ends where generation starts (the rollout engines, the driver's
rollout batches); responses and SFT sequences on the RIGHT. The masks go by each row's length, never by comparing
with the pad id: a row may itself contain the pad id (<|endoftext|>). Here, in `common`, because the lowest user is
the native rollout engine in `workers` and the driver pads the same way; it needs only torch, no model code.
"""
from __future__ import annotations

from typing import Sequence

import torch


def left_pad(rows: Sequence, value) -> torch.Tensor:
    """(B, longest) from 1-D rows (tensors or lists), each right-aligned after `value`s; the first row's dtype."""
    rows = [torch.as_tensor(row) for row in rows]
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for index, row in enumerate(rows):
        out[index, width - len(row):] = row
    return out


def right_pad(rows: Sequence[torch.Tensor], width: int, value) -> torch.Tensor:
    """(B, width) from 1-D rows, each followed by `value`s (or cut to `width`); long when there are no rows."""
    dtype = rows[0].dtype if len(rows) else torch.long
    out = torch.full((len(rows), width), value, dtype=dtype)
    for index, row in enumerate(rows):
        out[index, : len(row)] = row[:width]
    return out


def left_pad_mask(lengths: Sequence[int], width: int) -> torch.Tensor:
    """(B, width) long mask of the real positions of left-padded rows of these lengths."""
    return (torch.arange(width)[None] >= (width - torch.as_tensor(lengths))[:, None]).long()


def right_pad_mask(lengths: Sequence[int], width: int) -> torch.Tensor:
    """(B, width) long mask of the real positions of right-padded rows of these lengths."""
    return (torch.arange(width)[None] < torch.as_tensor(lengths)[:, None]).long()
