"""Outcome-reward advantage estimators (run on the driver, no gradients).

Each takes per-sample scores (B,), a response mask (B, T) and group ids (samples of one prompt share an id) and
returns `(advantages, returns)`, both (B, T), zero outside the mask. Sequence-level advantages are broadcast over
every response position, text tokens and latent positions alike, so the latent Gaussian log-densities are pushed
by the same signal as the words around them.

GAE (`gae`) takes the critic's per-position values and is token-level; ReMax (`remax`) takes each sample's
greedy baseline reward. Optional KL-in-reward (`kl`, `kl_coef`): the per-token reward is the score at the last
response position minus kl_coef·kl at every response position, and a sample's score is the sum of its token rewards (EasyR1: s_i = Σ_t r_it).
VLPO uses a KL loss instead, so this is off by default.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple

import torch

from .aggregation import masked_whiten

GROUP_EPS = 1e-6


def _as_scores(scores, response_mask: torch.Tensor) -> torch.Tensor:
    """Scores as a float tensor on the mask's device, checked against the batch size."""
    scores = torch.as_tensor(scores, device=response_mask.device)
    scores = scores if scores.is_floating_point() else scores.to(torch.float32)
    if scores.dim() != 1 or scores.shape[0] != response_mask.shape[0]:
        raise ValueError(f"scores must have shape ({response_mask.shape[0]},), got {tuple(scores.shape)}")
    return scores


def _group_index(group_ids: Sequence[Hashable], n: int, device) -> Tuple[torch.Tensor, int]:
    """Map arbitrary hashable ids (list, numpy array, tensor) to dense group indices 0..G-1."""
    ids = group_ids.tolist() if hasattr(group_ids, "tolist") else list(group_ids)
    if len(ids) != n:
        raise ValueError(f"group_ids has {len(ids)} entries for a batch of {n}")
    dense: Dict[Hashable, int] = {}
    index = [dense.setdefault(g, len(dense)) for g in ids]
    return torch.tensor(index, dtype=torch.long, device=device), len(dense)


def token_level_rewards(scores, response_mask: torch.Tensor, kl: Optional[torch.Tensor] = None,
                        kl_coef: float = 0.0) -> torch.Tensor:
    """Outcome reward at each sample's last response position, minus kl_coef·kl over the response (if given)."""
    scores = _as_scores(scores, response_mask)
    mask = response_mask.to(scores.dtype)
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=scores.dtype)
    last = (positions * mask).argmax(-1)
    rewards = torch.zeros_like(mask).scatter(1, last[:, None], scores[:, None]) * mask
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl.to(scores.dtype) * mask
    return rewards


def _sample_scores(scores, response_mask, kl, kl_coef) -> torch.Tensor:
    """s_i: the plain scores, or Σ_t of the KL-penalised token rewards when KL-in-reward is on."""
    if kl is None or not kl_coef:
        return _as_scores(scores, response_mask)
    return token_level_rewards(scores, response_mask, kl, kl_coef).sum(-1)


def _broadcast(per_sample: torch.Tensor, response_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Broadcast a (B,) advantage over the response positions; returns equal advantages (verl convention)."""
    adv = per_sample[:, None] * response_mask.to(per_sample.dtype)
    return adv, adv.clone()


@torch.no_grad()
def grpo(scores, response_mask: torch.Tensor, group_ids, norm_by_std: bool = True, eps: float = GROUP_EPS,
         kl: Optional[torch.Tensor] = None, kl_coef: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """GRPO: A_i = (s_i − mean_g)/(std_g + eps), unbiased std within the prompt group.

    The group mean is the baseline (no critic); dividing by the std makes the step size independent of the reward
    scale. `norm_by_std=False` gives Dr.GRPO (A_i = s_i − mean_g), which removes the bias towards groups with low
    reward variance. A group of one sample has no baseline and gets 0 (it carries no relative information).
    """
    s = _sample_scores(scores, response_mask, kl, kl_coef)
    index, n_groups = _group_index(group_ids, s.shape[0], s.device)
    count = torch.zeros(n_groups, dtype=s.dtype, device=s.device).index_add_(0, index, torch.ones_like(s))
    mean = torch.zeros_like(count).index_add_(0, index, s) / count
    centred = s - mean[index]
    adv = centred
    if norm_by_std:
        sq = torch.zeros_like(count).index_add_(0, index, centred ** 2)
        std = (sq / (count - 1).clamp(min=1)).sqrt()
        adv = centred / (std[index] + eps)
    adv = torch.where(count[index] > 1, adv, torch.zeros_like(adv))
    return _broadcast(adv, response_mask)


@torch.no_grad()
def rloo(scores, response_mask: torch.Tensor, group_ids, kl: Optional[torch.Tensor] = None,
         kl_coef: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """RLOO: A_i = s_i − mean of the other samples of the group.

    The leave-one-out baseline does not depend on s_i, so the estimator stays unbiased (GRPO's mean includes s_i).
    Equals n/(n−1)·(s_i − mean_g). A group of one sample has no other samples and gets 0.
    """
    s = _sample_scores(scores, response_mask, kl, kl_coef)
    index, n_groups = _group_index(group_ids, s.shape[0], s.device)
    count = torch.zeros(n_groups, dtype=s.dtype, device=s.device).index_add_(0, index, torch.ones_like(s))
    total = torch.zeros_like(count).index_add_(0, index, s)
    n = count[index]
    adv = torch.where(n > 1, s - (total[index] - s) / (n - 1).clamp(min=1), torch.zeros_like(s))
    return _broadcast(adv, response_mask)


@torch.no_grad()
def reinforce_plus_plus(scores, response_mask: torch.Tensor, group_ids=None, gamma: float = 1.0,
                        kl: Optional[torch.Tensor] = None, kl_coef: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (EasyR1/verl): G_t = r_t + γ·G_{t+1} over the response, then whitened over the batch.

    Token-level, so a per-token KL penalty in the reward (`kl`, `kl_coef`) shapes each position's return. The
    baseline is global (batch whitening over all masked tokens) rather than per group; `group_ids` is ignored.
    The return flows through positions whose mask is 0 *inside* the response (a forced `</abs_vis_token>` is not
    a policy decision but sits between decisions); only positions past the response's last decision are cut off.
    """
    rewards = token_level_rewards(scores, response_mask, kl, kl_coef)
    mask = response_mask.to(rewards.dtype)
    inside = _up_to_last(mask)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * inside[:, t]
        returns[:, t] = running
    advantages = masked_whiten(returns, response_mask) * mask
    return advantages, returns * mask


def _up_to_last(mask: torch.Tensor) -> torch.Tensor:
    """1 at every position up to and including each row's last masked position, 0 after it."""
    return mask.flip(-1).cummax(-1).values.flip(-1)


@torch.no_grad()
def ema_baseline(scores, response_mask: torch.Tensor, baseline: float,
                 momentum: float = 0.9) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """The released iReasoner rule: A_i = r_i − b, then b ← m·b + (1 − m)·r_i, sample by sample in batch order.

    Stateful (the baseline carries over steps), so it is not in the registry; returns (advantages, returns, b).
    Sample i sees the baseline after samples 0..i−1, as in the released one-sample-per-step loop.
    """
    s = _as_scores(scores, response_mask)
    per_sample = torch.empty_like(s)
    for i, score in enumerate(s.tolist()):
        per_sample[i] = score - baseline
        baseline = momentum * baseline + (1 - momentum) * score
    adv, ret = _broadcast(per_sample, response_mask)
    return adv, ret, float(baseline)


@torch.no_grad()
def grpo_passk(scores, response_mask: torch.Tensor, group_ids, eps: float = GROUP_EPS,
               kl: Optional[torch.Tensor] = None, kl_coef: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """GRPO pass@k (EasyR1's `grpo_passk`, arXiv 2503.19595): only the best sample of a group is pushed, by
    (s_max − s_second)/(std_g + eps); every other sample gets 0.

    Pass@k rewards a group for its best answer, so only the sample that set it is credited, and only by its margin
    over the runner-up (a tie gives 0). Ties for the best go to the first sample in batch order.
    """
    s = _sample_scores(scores, response_mask, kl, kl_coef)
    index, n_groups = _group_index(group_ids, s.shape[0], s.device)
    adv = torch.zeros_like(s)
    for group in range(n_groups):
        rows = (index == group).nonzero().squeeze(-1)
        if rows.numel() < 2:
            continue
        values = s[rows]
        best = int(values.argmax())  # the first maximum
        runner_up = values.topk(2).values[1]
        adv[rows[best]] = (values[best] - runner_up) / (values.std() + eps)
    return _broadcast(adv, response_mask)


@torch.no_grad()
def remax(scores, response_mask: torch.Tensor, group_ids=None, reward_baselines=None,
          kl: Optional[torch.Tensor] = None, kl_coef: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """ReMax (EasyR1's `remax`, arXiv 2310.10505): A_i = s_i − b_i, b_i the reward of one greedy rollout of the
    same prompt (`reward_baselines`, (B,), one per sample).

    The greedy answer is what the policy would say without exploring, so a sample is pushed up exactly when it beats
    it; no critic and no group are needed. Returns are EasyR1's: the reward-to-go of the token rewards.
    """
    if reward_baselines is None:
        raise ValueError("remax needs reward_baselines: the reward of a greedy rollout of each sample's prompt")
    s = _sample_scores(scores, response_mask, kl, kl_coef)
    baselines = _as_scores(reward_baselines, response_mask).to(s.dtype)
    advantages, _ = _broadcast(s - baselines, response_mask)
    rewards = token_level_rewards(scores, response_mask, kl, kl_coef if kl is not None else 0.0)
    returns = (rewards * response_mask.to(rewards.dtype)).flip(-1).cumsum(-1).flip(-1)
    return advantages, returns


@torch.no_grad()
def gae(scores, response_mask: torch.Tensor, group_ids=None, values: Optional[torch.Tensor] = None,
        gamma: float = 1.0, lam: float = 1.0, kl: Optional[torch.Tensor] = None,
        kl_coef: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """GAE with a critic (EasyR1's `gae`): δ_t = r_t + γ·V_next − V_t, A_t = δ_t + γλ·A_next over the response's
    decisions, returns R_t = A_t + V_t (the critic's targets), advantages whitened over the batch's masked positions.

    `values` (B, T) are the critic's V(s_t) for the state before each response position. Positions whose mask is 0
    inside the response (a forced `</abs_vis_token>`: not a decision) are skipped: they pass V_next and A_next
    through unchanged, as EasyR1/verl skip observation tokens. A latent step is a decision like a token (an action
    with a Gaussian log-likelihood), so it gets its own V, TD error and one step of discount (docs/design.md, §4).
    The recursion is per row (verl's form); EasyR1's `if response_mask[:, t]` is the same rule for one row.
    """
    if values is None:
        raise ValueError("gae needs the critic's values (worker.critic)")
    rewards = token_level_rewards(scores, response_mask, kl, kl_coef if kl is not None else 0.0)
    mask = response_mask.to(rewards.dtype)
    values = values.to(rewards.device, rewards.dtype) * mask
    next_value, running = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        decision = mask[:, t] > 0
        next_value = torch.where(decision, values[:, t], next_value)
        running = torch.where(decision, delta + gamma * lam * running, running)
        advantages[:, t] = running
    returns = (advantages + values) * mask
    return masked_whiten(advantages, response_mask) * mask, returns


ADVANTAGE_ESTIMATORS: Dict[str, Callable[..., Tuple[torch.Tensor, torch.Tensor]]] = {
    "gae": gae,
    "grpo": grpo,
    "grpo_passk": grpo_passk,
    "reinforce_plus_plus": reinforce_plus_plus,
    "remax": remax,
    "rloo": rloo,
}


def compute_advantages(name: str, scores, response_mask: torch.Tensor, group_ids, **kw) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the estimator registered under `name` (the value of `algorithm.adv_estimator`)."""
    try:
        estimator = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r} (algorithm.adv_estimator); "
            f"choose one of {', '.join(sorted(ADVANTAGE_ESTIMATORS))}"
        ) from None
    return estimator(scores, response_mask, group_ids, **kw)
