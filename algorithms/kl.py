"""KL estimators against the reference policy, the exact KL at latent positions, and KL-coefficient controllers.

Text positions: the estimators act on per-position log-probs of the sampled token (`full_vocab_kl` takes whole
distributions instead, for self-evolution's released KL). Latent positions: both policies
are isotropic Gaussians whose means are known, so the KL is taken in closed form (`gaussian_kl`) instead of being
estimated from the one recorded latent. A one-sample log-ratio there carries D·log(σ/σ_ref) (378 at D = 3584, σ = 10,
σ_ref = 9), far past low_var_kl's ±20 clamp, which left the latent KL at a constant with zero gradient.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch

LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def kl_k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k1 = logp − ref: unbiased for KL(π‖π_ref) under samples from π, but high variance and can be negative."""
    return log_probs - ref_log_probs


def kl_abs(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """|logp − ref|: non-negative, biased; kept for EasyR1 compatibility."""
    return (log_probs - ref_log_probs).abs()


def kl_mse(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k2 = ½(logp − ref)²: non-negative, low variance, biased for large divergences."""
    return 0.5 * (log_probs - ref_log_probs).square()


def kl_low_var(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k3 (Schulman): k = ref − logp, KL ≈ e^k − k − 1 — unbiased, always ≥ 0, low variance.

    k is clamped to ±20 and the result to ±10 so one extreme position (e.g. a latent whose Gaussian log-density
    moved far) cannot produce inf/NaN or dominate the loss.
    """
    k = torch.clamp(ref_log_probs - log_probs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.clamp(torch.exp(k) - k - 1.0, -K3_CLAMP, K3_CLAMP)


KL_ESTIMATORS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "kl": kl_k1,
    "k1": kl_k1,
    "abs": kl_abs,
    "mse": kl_mse,
    "k2": kl_mse,
    "low_var_kl": kl_low_var,
    "k3": kl_low_var,
}


def compute_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_penalty: str = "low_var_kl") -> torch.Tensor:
    """Per-position KL estimate (same shape as the inputs) selected by name (`algorithm.kl_penalty`)."""
    try:
        estimator = KL_ESTIMATORS[kl_penalty]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {kl_penalty!r} (algorithm.kl_penalty); choose one of {', '.join(KL_ESTIMATORS)}"
        ) from None
    return estimator(log_probs, ref_log_probs)


def full_vocab_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """The exact KL(π‖π_ref) per position from full log-distributions (…, V): Σ_v π(v)·(log π(v) − log π_ref(v)).

    What the released iReasoner adds to its loss (self_evolution.kl=full): no sampling noise and ≥ 0 at every
    position, at the price of the reference's whole distribution where the estimators need one log-prob. Its gradient
    flows through π only (the reference is detached by its caller). fp32.
    """
    log_probs, ref_log_probs = log_probs.float(), ref_log_probs.float()
    return (log_probs.exp() * (log_probs - ref_log_probs)).sum(-1)


def gaussian_kl(means: torch.Tensor, ref_means: torch.Tensor, sigma: float, ref_sigma: float) -> torch.Tensor:
    """KL(N(μ, σ²I) ‖ N(μ_ref, σ_ref²I)) per row of (…, D) means, in fp32:
    D·log(σ_ref/σ) + (D·σ² + ‖μ − μ_ref‖²)/(2σ_ref²) − D/2.

    The direction of low_var_kl on text (KL(π‖π_ref)). Exact with equal σ too (‖μ − μ_ref‖²/(2σ²)), and its
    gradient (μ − μ_ref)/σ_ref² has no sampling noise, so it is used at every latent position, whatever the σ.
    """
    dim = means.shape[-1]
    distance = (means.float() - ref_means.float()).square().sum(-1)
    return (dim * math.log(ref_sigma / sigma) + (dim * sigma ** 2 + distance) / (2.0 * ref_sigma ** 2)
            - dim / 2.0)


def with_exact_latent_kl(kl: torch.Tensor, latent_mask: torch.Tensor, means: torch.Tensor, ref_means: torch.Tensor,
                         sigma: float, ref_sigma: float, scale_by_dim: bool = False) -> torch.Tensor:
    """`kl` (B, T) with its latent positions (`latent_mask`, row-major like `means` and `ref_means`) replaced by
    the exact Gaussian KL, divided by D under `worker.actor.latent_logprob_scale=dim` like the log-densities."""
    count = int(latent_mask.sum())
    if means.shape[0] != count or ref_means.shape[0] != count:
        raise ValueError(f"{means.shape[0]} actor and {ref_means.shape[0]} reference latent means for {count} "
                         "latent positions")
    if count == 0:
        return kl
    exact = gaussian_kl(means, ref_means.to(means.device), sigma, ref_sigma)
    if scale_by_dim:
        exact = exact / means.shape[-1]
    return kl.masked_scatter(latent_mask.to(kl.device), exact.to(kl.dtype))


class FixedKLController:
    """Constant KL coefficient (the usual choice with a KL loss, e.g. VLPO's 0.01)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict:
        return {"type": "fixed", "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019) adaptive coefficient, as in verl: steer the measured KL towards `target_kl`.

    error = clip(KL/target − 1, ±0.2); value ← value·(1 + error·n_steps/horizon). The clip bounds how fast the
    coefficient moves on one noisy measurement; `horizon` sets the time constant in samples/steps.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float):
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"target_kl and horizon must be > 0, got {target_kl} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"type": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


class ExponentialKLController:
    """iReasoner's per-role rule, applied after every update: β ← clip(β·exp(rate·(KL − target)/target), lo, hi).

    Multiplicative in the relative error, so β moves fast when the KL is far from its target; rate 0 keeps β fixed.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, rate: float, low: float = 1e-8, high: float = 100.0):
        if target_kl <= 0 or rate < 0:
            raise ValueError(f"target_kl must be > 0 and rate >= 0, got {target_kl} and {rate}")
        self.value, self.target, self.rate, self.low, self.high = float(init_kl_coef), float(target_kl), rate, low, high

    def update(self, current_kl: float, n_steps: int = 1) -> None:
        for _ in range(n_steps):
            moved = self.value * math.exp(self.rate * (float(current_kl) - self.target) / self.target)
            self.value = min(max(moved, self.low), self.high)

    def state_dict(self) -> dict:
        return {"type": "exponential", "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def make_kl_controller(kl_type: str = "fixed", kl_coef: float = 0.0, target_kl: float = 0.1,
                       horizon: float = 10000.0):
    """Build the controller named by `kl_type` (`fixed` | `adaptive`), with EasyR1's defaults."""
    if kl_type == "fixed":
        return FixedKLController(kl_coef)
    if kl_type == "adaptive":
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise ValueError(f"unknown KL controller type {kl_type!r}; choose 'fixed' or 'adaptive'")
