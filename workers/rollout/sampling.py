"""Batched next-token sampling: masks and biases folded into one precomputed vector, then greedy or
temperature / top-k / top-p sampling with an explicit `torch.Generator` (same seed, same samples).

Recorded log-probs come from the raw logits at the rollout temperature (`log_probs_of`), which is what the
training forward re-computes; the processing here only decides which token is drawn.
"""
from __future__ import annotations

import secrets

import torch

from common.seeding import derive_seed

from workers.rollout.base import SamplingParams


def make_generator(seed: int | None, device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def base_seed(seed: int | None) -> int:
    """The seed a generate call derives its per-request seeds from (a fresh random one when `seed` is None)."""
    return secrets.randbits(63) if seed is None else seed


def request_seed(seed: int, index: int) -> int:
    """Seed of request `index` (= prompt * n + sample) in a generate call seeded with `seed`.

    Every engine derives per-request randomness from it, so the same request gets the same noise whatever engine,
    batch composition or scheduling order produced it (the project's one seed derivation, common.seeding).
    """
    return derive_seed(seed, "request", index)


class LatentNoise:
    """Exploration noise per request: request i draws from its own fp32 CPU generator seeded with
    `request_seed(seed, i)`, one (D,) vector per latent in placement order; the engine scales it by
    `monet_models.latent_tokens.noise_scale(h, std, relative)`."""

    def __init__(self, std: float, seed: int, first_request: int = 0, relative: bool = False):
        self.std, self.relative = std, relative
        self.seed = seed
        self.first_request = first_request
        self._generators: dict[int, torch.Generator] = {}

    def draw(self, rows: list[int], dim: int) -> torch.Tensor:
        """(len(rows), dim) fp32 CPU: N(0, 1) for the next latent of each row (row = request - first)."""
        noise = torch.empty(len(rows), dim, dtype=torch.float32)
        for out, row in zip(noise, rows):
            generator = self._generators.get(row)
            if generator is None:
                generator = torch.Generator().manual_seed(request_seed(self.seed, self.first_request + row))
                self._generators[row] = generator
            out.copy_(torch.randn(dim, generator=generator, dtype=torch.float32))
        return noise


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
        self.greedy = params.greedy_text

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
