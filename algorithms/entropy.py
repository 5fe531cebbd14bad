"""The policy's entropy at text positions from final hidden states through the lm_head, chunk by chunk.

H = −Σ_v p_v·log p_v of softmax(head(h)/T), in fp32. Like the chunked token log-probs, only `chunk_size` positions'
full-vocabulary rows exist at once, and with gradients each chunk is checkpointed (its backward recomputes them).
Latent steps have no entry here: a Gaussian N(μ, σ²I) has entropy (D/2)·log(2πeσ²), a constant of σ and not of θ,
so it carries no gradient and says nothing about collapse (docs/design.md, §4).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def chunked_entropy(head: Callable, hidden: torch.Tensor, temperature: float = 1.0, chunk_size: int = 0) -> torch.Tensor:
    """(n,) entropy of softmax(head(hidden) / T) for (n, D) hidden states; `chunk_size` rows at a time (0: all)."""
    size = chunk_size if chunk_size > 0 else max(hidden.shape[0], 1)
    pieces = []
    for start in range(0, hidden.shape[0], size):
        part = hidden[start:start + size]
        pieces.append(checkpoint(_entropy, head, part, temperature, use_reentrant=False) if torch.is_grad_enabled()
                      else _entropy(head, part, temperature))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _entropy(head: Callable, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden)
    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def next_token_entropy(hidden_states: torch.Tensor, lm_head: Callable, temperature: float = 1.0,
                       chunk_size: int = 0) -> torch.Tensor:
    """Flat (B·(L−1),) entropy of the next-token distribution at each position but the last, row-major: aligned
    with `monet_models.transformers.log_probs.next_token_log_probs`."""
    return chunked_entropy(lm_head, hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1]), temperature,
                           chunk_size)
