"""RL algorithm pieces as pure torch functions: advantages, PPO policy loss, KL, loss aggregation."""
from .advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    ema_baseline,
    grpo,
    reinforce_plus_plus,
    rloo,
    token_level_rewards,
)
from .aggregation import LOSS_AGG_MODES, aggregate_loss, masked_mean, masked_sum, masked_var, masked_whiten
from .kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    ExponentialKLController,
    FixedKLController,
    compute_kl,
    gaussian_kl,
    kl_abs,
    kl_k1,
    kl_low_var,
    kl_mse,
    make_kl_controller,
    with_exact_latent_kl,
)
from .policy_loss import compute_policy_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS", "compute_advantages", "ema_baseline", "grpo", "rloo", "reinforce_plus_plus", "token_level_rewards",
    "LOSS_AGG_MODES", "aggregate_loss", "masked_mean", "masked_sum", "masked_var", "masked_whiten",
    "KL_ESTIMATORS", "compute_kl", "kl_k1", "kl_abs", "kl_mse", "kl_low_var", "gaussian_kl", "with_exact_latent_kl",
    "FixedKLController", "AdaptiveKLController", "ExponentialKLController", "make_kl_controller",
    "compute_policy_loss",
]
