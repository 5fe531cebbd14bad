"""RL algorithm pieces as pure torch functions: advantages, policy and value losses, entropy, KL, loss aggregation."""
from .advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    ema_baseline,
    gae,
    grpo,
    grpo_passk,
    reinforce_plus_plus,
    remax,
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
from .entropy import chunked_entropy, next_token_entropy
from .policy_loss import LOSS_TYPES, compute_policy_loss
from .value_loss import compute_value_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS", "compute_advantages", "ema_baseline", "gae", "grpo", "grpo_passk", "remax", "rloo",
    "reinforce_plus_plus", "token_level_rewards",
    "LOSS_AGG_MODES", "aggregate_loss", "masked_mean", "masked_sum", "masked_var", "masked_whiten",
    "KL_ESTIMATORS", "compute_kl", "kl_k1", "kl_abs", "kl_mse", "kl_low_var", "gaussian_kl", "with_exact_latent_kl",
    "FixedKLController", "AdaptiveKLController", "ExponentialKLController", "make_kl_controller",
    "LOSS_TYPES", "compute_policy_loss", "compute_value_loss", "chunked_entropy", "next_token_entropy",
]
