"""Batched next-token sampling: masks and biases folded into one precomputed vector, then greedy or
temperature / top-k / top-p sampling with an explicit `torch.Generator` (same seed, same samples).

Recorded log-probs come from the raw logits at the rollout temperature (`log_probs_of`), which is what the
training forward re-computes; the processing here only decides which token is drawn.
"""
from __future__ import annotations

import torch

from workers.rollout.base import SamplingParams


def make_generator(seed: int | None, device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def bias_vector(params: SamplingParams, blocked: torch.Tensor) -> torch.Tensor:
    """(V,) fp32 additive bias: -inf at blocked ids, plus the user's `logit_bias`."""
    bias = torch.zeros(blocked.shape[0], dtype=torch.float32, device=blocked.device)
    for token, value in (params.logit_bias or {}).items():
        bias[token] += value
    return bias.masked_fill(blocked, float("-inf"))


def log_probs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at `tokens`, computed without materialising the full log-softmax."""
    scaled = logits / temperature if temperature != 1.0 else logits
    return scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


class Sampler:
    """Draws one token per row from fp32 logits (B, V) under `params`."""

    def __init__(self, params: SamplingParams, blocked: torch.Tensor, generator: torch.Generator):
        self.params = params
        self.bias = bias_vector(params, blocked)
        self.generator = generator
        self.greedy = params.strategy == "greedy" or params.temperature == 0

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, self.params.repetition_penalty)
        logits = logits + self.bias
        if self.greedy:
            return logits.argmax(-1)
        if self.params.temperature != 1.0:
            logits = logits / self.params.temperature
        if 0 < self.params.top_k < logits.shape[-1]:
            logits = _top_k(logits, self.params.top_k)
        if self.params.top_p < 1.0:
            logits = _top_p(logits, self.params.top_p)
        return sample_inverse_cdf(torch.softmax(logits, dim=-1), self.generator)


def sample_inverse_cdf(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row by inverting the CDF: one uniform per row instead of one random number per vocabulary
    entry (multinomial and exponential races cost ~25x more on CPU). `right=True` and u < total mass make
    zero-probability (masked) ids impossible."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as in transformers and vLLM) on ids already in the prompt or the response."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def _top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest prefix of the sorted distribution whose mass reaches top_p (the top token always stays)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
