"""The latent-block state machine of the token layout of docs/design.md, independent of any engine.

Each sequence is either writing text or inside a latent block. In text mode a token is sampled (never-sampled
ids and `</abs_vis_token>` masked; `<abs_vis_token>` too when latents are off). Sampling `<abs_vis_token>` opens a
block: the next K positions are `<abs_vis_token_pad>` fed with the previous position's final hidden state, then
`</abs_vis_token>` is forced. Inside a block nothing is sampled, so EOS and stray tokens cannot appear.

The state is a tensor over a batch of sequences (a single sequence is a batch of one), so the native engine steps
all rows with a few tensor ops and no per-token Python, and a vLLM logits processor can hold the same object,
selecting rows as requests come and go.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from monet_models.latent_tokens import LatentTokens

TEXT = -1  # `count` value of a sequence writing text; 0..K = latents fed so far in the open block


@dataclass(frozen=True)
class LatentLayout:
    """Ids, K and what may be sampled in text mode; builds the masks once."""

    tokens: LatentTokens
    latent_size: int
    allow_latents: bool
    vocab_size: int  # width of the logits
    real_vocab_size: int | None = None  # ids at or above it (embedding padding) are never sampled

    def blocked_in_text(self, device=None) -> torch.Tensor:
        """(V,) bool: ids that may not be sampled in text mode."""
        blocked = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        ids = list(self.tokens.never_sampled) + [self.tokens.end]
        if not self.allow_latents:
            ids.append(self.tokens.start)
        blocked[torch.tensor(ids, device=device)] = True
        if self.real_vocab_size is not None and self.real_vocab_size < self.vocab_size:
            blocked[self.real_vocab_size:] = True
        return blocked

    def mask_table(self, device=None) -> torch.Tensor:
        """(3, V) bool disallowed ids for [text, forced pad, forced end] rows."""
        only = torch.ones(2, self.vocab_size, dtype=torch.bool, device=device)
        only[0, self.tokens.pad] = False
        only[1, self.tokens.end] = False
        return torch.cat([self.blocked_in_text(device).unsqueeze(0), only])


@dataclass
class LatentStep:
    """Outcome of one step for every row."""

    tokens: torch.Tensor  # (B,) the token placed in the sequence
    feed_latent: torch.Tensor  # (B,) bool: the next input is the previous hidden state (a `<abs_vis_token_pad>`)
    sampled: torch.Tensor  # (B,) bool: the token was sampled (text mode), not forced


class LatentStates:
    """Latent state of a batch of sequences: `count` is TEXT or the number of latents fed in the open block."""

    def __init__(self, layout: LatentLayout, batch_size: int, device=None):
        self.layout = layout
        self.count = torch.full((batch_size,), TEXT, dtype=torch.long, device=device)
        self._table = layout.mask_table(device)

    @property
    def in_block(self) -> torch.Tensor:
        return self.count >= 0

    def forced_tokens(self) -> torch.Tensor:
        """(B,) the token each in-block row must take next (pad until K latents, then end); -1 for text rows."""
        tokens = self.layout.tokens
        forced = torch.where(self.count < self.layout.latent_size, tokens.pad, tokens.end)
        return torch.where(self.in_block, forced, -1)

    def logits_mask(self) -> torch.Tensor:
        """(B, V) bool of disallowed ids; in-block rows allow only their forced token (for samplers that always sample)."""
        kind = torch.where(self.count < 0, 0, torch.where(self.count < self.layout.latent_size, 1, 2))
        return self._table[kind]

    def advance(self, sampled: torch.Tensor) -> LatentStep:
        """Place the next token of every row: `sampled` for text rows, the forced token inside blocks."""
        K, tokens = self.layout.latent_size, self.layout.tokens
        in_block = self.in_block
        placed = torch.where(in_block, self.forced_tokens(), sampled)
        feed = in_block & (self.count < K)
        opens = ~in_block & (sampled == tokens.start) & self.layout.allow_latents
        closes = in_block & (self.count >= K)
        count = torch.where(feed, self.count + 1, self.count)
        count = torch.where(closes, TEXT, count)
        self.count = torch.where(opens, 0, count)
        return LatentStep(placed, feed, ~in_block)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (compaction when sequences finish)."""
        self.count = self.count[rows]
