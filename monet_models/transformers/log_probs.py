"""Per-position log-likelihoods of a sequence with text tokens and latent steps (docs/design.md, the VLPO objective).

Both use the usual causal shift: the value for position p comes from the model's output at p-1. For a latent
pad that output is the mean that produced z_p (not the position z_p is fed into), so the Gaussian is centred on
the prediction of the step that generated it.

Token log-probs never hold more than one chunk of `chunk_size` positions' full-vocabulary rows in fp32
(`worker.actor.logprob_chunk_size`; docs/design.md, log-prob memory): `_TokenLogProbs` keeps only the logits
it was given and each row's log-normaliser, and recomputes the softmax chunk by chunk in the backward. Given
the final hidden states and the lm_head (`next_token_log_probs`, the path the actor takes) each chunk's logits
are also recomputed in the backward, so no (tokens x vocab) logits exist at all.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                    chunk_size: int = 0) -> torch.Tensor:
    """log softmax(logits / T) at `tokens`; logits (..., V) already aligned with tokens (...). fp32.
    `chunk_size` > 0 bounds the fp32 working memory to chunk_size x V (0: all positions at once)."""
    return head_log_probs(None, logits, tokens, temperature, chunk_size)


def head_log_probs(head: Optional[Callable], inputs: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   chunk_size: int = 0) -> torch.Tensor:
    """log softmax(head(inputs) / T) at `tokens` (...), fp32; `head` None means `inputs` are the logits (..., V),
    else it maps (n, D) hidden states to (n, V) logits (the lm_head, or any module or function).

    With a head and gradients each chunk is checkpointed: its backward recomputes the chunk's logits instead of
    keeping them. Values and gradients equal the unchunked computation up to fp32 rounding.
    """
    return _flat_log_probs(head, inputs, tokens, temperature, chunk_size).view(tokens.shape)


def _flat_log_probs(head, inputs, tokens, temperature, chunk_size) -> torch.Tensor:
    """`head_log_probs` flattened to (n,) in row-major order, a new tensor (never a view)."""
    flat_inputs, flat_tokens = inputs.reshape(-1, inputs.shape[-1]), tokens.reshape(-1)
    if head is None:
        return _TokenLogProbs.apply(flat_inputs, flat_tokens, temperature, chunk_size)
    pieces = []
    for rows in _chunks(flat_tokens.shape[0], chunk_size):
        part = (head, flat_inputs[rows], flat_tokens[rows], temperature)
        pieces.append(checkpoint(_head_chunk, *part, use_reentrant=False) if torch.is_grad_enabled()
                      else _head_chunk(*part))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _head_chunk(head: Callable, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return _TokenLogProbs.apply(head(hidden), tokens, temperature, 0)


class _TokenLogProbs(torch.autograd.Function):
    """(n,) fp32 log softmax(logits / T) at `tokens` from (n, V) logits, `chunk_size` rows at a time (0: all).

    Autograd through log_softmax would keep an fp32 (n, V) output and make three more in the backward; this keeps
    the logits it was given (no copy) and the (n,) log-normalisers, and works on one fp32 copy of a chunk of rows
    at a time in either pass, the temperature applied to that copy in place (as EasyR1 and verl divide theirs).
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_size):
        picked = logits.new_empty(tokens.shape, dtype=torch.float32)
        normaliser = torch.empty_like(picked)
        for rows in _chunks(tokens.shape[0], chunk_size):
            scaled = _scaled(logits[rows], temperature)
            picked[rows] = scaled.gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1)
            top = scaled.amax(-1, keepdim=True)
            normaliser[rows] = scaled.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))
            del scaled  # before the next chunk's copy exists: one fp32 chunk at a time
        ctx.save_for_backward(logits, tokens, normaliser)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return picked.sub_(normaliser)

    @staticmethod
    def backward(ctx, grad):
        """d/dx log softmax(x / T)[t] = (onehot(t) - softmax(x / T)) / T, per row scaled by the incoming grad."""
        logits, tokens, normaliser = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for rows in _chunks(tokens.shape[0], ctx.chunk_size):
            weight = (grad[rows] / ctx.temperature).unsqueeze(-1)
            probs = _scaled(logits[rows], ctx.temperature).sub_(normaliser[rows].unsqueeze(-1)).exp_()
            grad_logits[rows] = probs.mul_(-weight).scatter_add_(-1, tokens[rows].unsqueeze(-1), weight)
            del probs
        return grad_logits, None, None, None


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A new fp32 copy of `logits` / T (the caller's logits are never modified)."""
    scaled = logits.to(torch.float32, copy=True)
    return scaled.div_(temperature) if temperature != 1.0 else scaled


def _chunks(count: int, chunk_size: int) -> list[slice]:
    size = chunk_size if chunk_size > 0 else max(count, 1)
    return [slice(start, start + size) for start in range(0, count, size)] or [slice(0, 0)]


def next_token_log_probs(hidden_states: torch.Tensor, lm_head: Callable, input_ids: torch.Tensor,
                         temperature: float = 1.0, chunk_size: int = 0) -> torch.Tensor:
    """The log-prob of each next token of `input_ids` (B, L) from the final hidden states (B, L, D) through
    `lm_head`, chunk by chunk: the `head` the latent model's forward runs in place of its full logits.

    Flat, (B·(L-1),) in row-major order (`.view(B, L - 1)` it): a model output that is a view draws FSDP2's warning
    that an in-place op on it would skip the backward all-gather.
    """
    return _flat_log_probs(lm_head, hidden_states[:, :-1], input_ids[:, 1:], temperature, chunk_size)


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
    chunk_size: int = 0,
) -> torch.Tensor:
    """Log-likelihood of every position (B, L): token log-probs, Gaussian terms at latent pads, 0 at position 0.

    Aligned with `input_ids` so the same code serves padded batches and packed (1, N) streams; in a packed
    stream the first position of each sequence gets a meaningless value, which is always a prompt position.
    """
    text = token_log_probs(logits[:, :-1], input_ids[:, 1:], temperature, chunk_size)
    return with_latent_densities(text, hidden_states, input_ids, latent_embeds, latent_pad_id, sigma, scale_by_dim)


def with_latent_densities(text: torch.Tensor, hidden_states: torch.Tensor, input_ids: torch.Tensor,
                          latent_embeds: torch.Tensor | None, latent_pad_id: int, sigma: float = 10.0,
                          scale_by_dim: bool = False) -> torch.Tensor:
    """(B, L) from the (B, L-1) next-token log-probs `text`: the Gaussian term at latent pads, 0 at position 0."""
    latent_mask = input_ids[:, 1:] == latent_pad_id
    count = int(latent_mask.sum())
    if count:
        if latent_embeds is None or latent_embeds.shape[0] != count:
            got = 0 if latent_embeds is None else latent_embeds.shape[0]
            raise ValueError(f"{got} latent vectors for {count} latent pads")
        density = latent_log_density(latent_embeds, latent_means(hidden_states, input_ids, latent_pad_id), sigma,
                                     scale_by_dim)
        text = text.masked_scatter(latent_mask, density)
    return torch.nn.functional.pad(text, (1, 0))


def latent_means(hidden_states: torch.Tensor, input_ids: torch.Tensor, latent_pad_id: int) -> torch.Tensor:
    """(latents, D) fp32: the mean μ of each latent pad of `input_ids` (the hidden state one position before it),
    in row-major order of the pads, the order the latents are recorded in."""
    return hidden_states[:, :-1][input_ids[:, 1:] == latent_pad_id].float()
