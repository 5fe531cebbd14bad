"""Advantage estimators, PPO loss, KL estimators/controllers and loss aggregation (pure torch, fast)."""
import math

import numpy as np
import pytest
import torch

from algorithms import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    chunked_entropy,
    compute_advantages,
    compute_kl,
    compute_policy_loss,
    compute_value_loss,
    make_kl_controller,
    masked_mean,
    masked_whiten,
    token_level_rewards,
)


def _mask(lengths, T):
    return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()


# ---------------------------------------------------------------- advantages

def test_grpo_hand_example_and_broadcast():
    mask = _mask([3, 2, 4, 1], 5)
    adv, ret = compute_advantages("grpo", [1.0, 0.0, 0.0, 1.0], mask, ["a", "a", "a", "a"])
    expected = 0.5 / math.sqrt(1.0 / 3.0)  # mean 0.5, unbiased std sqrt(1/3) -> 0.866
    per_sample = torch.tensor([expected, -expected, -expected, expected])
    assert torch.allclose(adv, per_sample[:, None] * mask, atol=1e-5)
    assert abs(adv[0, 0].item() - 0.8660) < 1e-3
    assert torch.all(adv[mask == 0] == 0)
    assert torch.equal(adv, ret)


def test_grpo_groups_singletons_and_dr_grpo():
    mask = torch.ones(5, 3)
    ids = np.array(["p1", "p2", "p1", "p3", "p2"], dtype=object)
    scores = torch.tensor([1.0, 2.0, 3.0, 7.0, 2.0])
    adv, _ = compute_advantages("grpo", scores, mask, ids)
    assert torch.allclose(adv[:, 0], torch.tensor([-1 / math.sqrt(2), 0.0, 1 / math.sqrt(2), 0.0, 0.0]), atol=1e-5)
    assert torch.all(adv[3] == 0)  # group of one
    dr, _ = compute_advantages("grpo", scores, mask, ids, norm_by_std=False)
    assert torch.allclose(dr[:, 0], torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0]))


def test_rloo_values():
    mask = _mask([2, 2, 2, 1], 2)
    adv, _ = compute_advantages("rloo", [1.0, 0.0, 2.0, 5.0], mask, [0, 0, 0, 1])
    # 1 - (0+2)/2 = 0, 0 - (1+2)/2 = -1.5, 2 - (1+0)/2 = 1.5; singleton -> 0
    assert torch.allclose(adv[:, 0], torch.tensor([0.0, -1.5, 1.5, 0.0]))
    assert adv[3, 1] == 0


def test_reinforce_plus_plus_whitening_and_returns():
    torch.manual_seed(0)
    mask = _mask([4, 2, 5, 3], 6)
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0])
    adv, ret = compute_advantages("reinforce_plus_plus", scores, mask, None, gamma=0.9)
    # return at position t = gamma^(L-1-t) * score
    assert torch.allclose(ret[0, :4], torch.tensor([0.9 ** 3, 0.9 ** 2, 0.9, 1.0]))
    assert torch.all(ret[mask == 0] == 0) and torch.all(adv[mask == 0] == 0)
    values = adv[mask.bool()]
    assert abs(values.mean().item()) < 1e-5
    assert abs(values.std().item() - 1.0) < 1e-4
    # KL-in-reward lowers the earlier returns too
    kl = torch.full((4, 6), 0.1)
    _, ret_kl = compute_advantages("reinforce_plus_plus", scores, mask, None, gamma=1.0, kl=kl, kl_coef=1.0)
    assert torch.allclose(ret_kl[0, :4], torch.tensor([1 - 0.4, 1 - 0.3, 1 - 0.2, 1 - 0.1]))


def test_reinforce_plus_plus_return_flows_through_forced_latent_end_tokens():
    # response: text, <abs_vis_token>, 2 latents, forced </abs_vis_token> (mask 0), text, text; then padding
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0],
                         [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    _, ret = compute_advantages("reinforce_plus_plus", torch.tensor([2.0, 1.0]), mask, None, gamma=1.0)
    assert torch.equal(ret, torch.tensor([2.0, 1.0])[:, None] * mask)  # every decision gets the score, none 0
    _, ret = compute_advantages("reinforce_plus_plus", torch.tensor([1.0, 1.0]), mask, None, gamma=0.5)
    assert ret[0, 3].item() == pytest.approx(0.5 ** 3)  # discounting counts the forced position too


def test_token_level_rewards_last_position():
    mask = _mask([3, 1, 0], 4)
    r = token_level_rewards(torch.tensor([2.0, 3.0, 4.0]), mask)
    assert r.tolist() == [[0, 0, 2, 0], [3, 0, 0, 0], [0, 0, 0, 0]]


def test_unknown_estimator_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        compute_advantages("ppo", [1.0], torch.ones(1, 2), [0])
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages("grpo", [1.0, 2.0], torch.ones(2, 2), [0])
    with pytest.raises(ValueError, match="critic's values"):
        compute_advantages("gae", [1.0], torch.ones(1, 2), [0])
    with pytest.raises(ValueError, match="reward_baselines"):
        compute_advantages("remax", [1.0], torch.ones(1, 2), [0])
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "grpo_passk", "remax", "rloo", "reinforce_plus_plus"}


# ---------------------------------------------------------------- policy loss

def _loss(ratio, adv, **kw):
    logp = torch.log(torch.tensor(ratio, dtype=torch.float64)).requires_grad_(True)
    old = torch.zeros_like(logp)
    A = torch.tensor(adv, dtype=torch.float64)
    loss, metrics = compute_policy_loss(logp, old, A, torch.ones_like(A), **kw)
    loss.sum().backward()
    return loss.detach(), logp.grad, metrics


def test_ppo_unclipped_region_is_minus_a_r():
    ratio, adv = [[1.1, 0.9, 1.25]], [[2.0, -1.0, 0.5]]
    loss, grad, m = _loss(ratio, adv, clip_ratio_low=0.2, clip_ratio_high=0.3)
    assert torch.allclose(loss, -torch.tensor(adv, dtype=torch.float64) * torch.tensor(ratio, dtype=torch.float64))
    # d(-A r)/d logp = -A r
    assert torch.allclose(grad, loss)
    assert m["pg_clipfrac_higher"] == 0 and m["pg_clipfrac_lower"] == 0


def test_ppo_clip_higher_bounds_and_zero_grad():
    ratios, advs = [[1.5, 0.75, 1.25, 0.5, 1.25]], [[1.0, -1.0, 1.0, 1.0, -1.0]]
    loss, grad, m = _loss(ratios, advs, clip_ratio_low=0.2, clip_ratio_high=0.3)
    assert loss[0, 0].item() == pytest.approx(-1.3)  # A>0, r above 1+eps_high -> -A(1+eps_high)
    assert loss[0, 1].item() == pytest.approx(0.8)  # A<0, r below 1-eps_low -> -A(1-eps_low)
    assert grad[0, 0] == 0 and grad[0, 1] == 0  # clipped: no gradient
    # 1.25 lies inside the asymmetric range (0.8, 1.3) although it is outside a symmetric 0.2 clip
    assert loss[0, 2].item() == pytest.approx(-1.25) and grad[0, 2].item() == pytest.approx(-1.25)
    # pessimistic bound: A>0 with a small ratio and A<0 with a large one are not clipped
    assert loss[0, 3].item() == pytest.approx(-0.5) and grad[0, 3] != 0
    assert loss[0, 4].item() == pytest.approx(1.25) and grad[0, 4] != 0
    assert m["pg_clipfrac_higher"] == pytest.approx(2 / 5)
    assert m["pg_clipfrac_lower"] == 0


def test_ppo_dual_clip_caps_negative_advantage():
    loss, grad, m = _loss([[50.0, 2.0, 50.0]], [[-1.0, -1.0, 1.0]], clip_ratio_dual=3.0)
    assert loss[0, 0].item() == pytest.approx(3.0)  # capped at -A * c
    assert grad[0, 0] == 0
    assert loss[0, 1].item() == pytest.approx(2.0) and grad[0, 1] != 0  # below the cap: -A r
    assert loss[0, 2].item() == pytest.approx(-1.3)  # dual clip does not apply for A > 0
    assert m["pg_clipfrac_lower"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        _loss([[1.0]], [[1.0]], clip_ratio_dual=1.0)


def test_ppo_mask_metrics_and_extreme_log_ratio():
    logp = torch.tensor([[0.0, -0.5, 100.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, m = compute_policy_loss(logp, old, torch.tensor([[1.0, 1.0, 1.0]]), mask)
    assert loss[0, 2] == 0 and torch.isfinite(loss).all()
    assert m["ppo_kl"] == pytest.approx(0.25)  # mean(old - new) over the two masked tokens
    assert m["pg_clipfrac_higher"] == 0
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all()


# ---------------------------------------------------------------- KL

def test_low_var_kl_properties():
    logp = torch.randn(4, 7)
    assert torch.all(compute_kl(logp, logp, "low_var_kl") == 0)
    ref = logp + torch.randn(4, 7) * 3
    assert torch.all(compute_kl(logp, ref, "low_var_kl") >= 0)
    k = 0.7
    val = compute_kl(torch.tensor([0.0]), torch.tensor([k]), "low_var_kl")
    assert val.item() == pytest.approx(math.exp(k) - k - 1, rel=1e-6)
    assert compute_kl(torch.tensor([0.0]), torch.tensor([50.0]), "low_var_kl").item() == 10.0  # clamped
    assert torch.isfinite(compute_kl(torch.tensor([-1e4]), torch.tensor([0.0]), "low_var_kl")).all()


def test_other_kl_estimators_and_unknown():
    logp, ref = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0])
    assert compute_kl(logp, ref, "kl").tolist() == [0.5, -2.0]
    assert compute_kl(logp, ref, "abs").tolist() == [0.5, 2.0]
    assert compute_kl(logp, ref, "mse").tolist() == [0.125, 2.0]
    with pytest.raises(ValueError, match="unknown KL estimator 'full'"):
        compute_kl(logp, ref, "full")


def test_kl_full_is_refused_at_load():
    from RL.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="algorithm.kl_penalty"):
        load_config(["algorithm.kl_penalty=full"], require_inputs=False)


def test_adaptive_controller_follows_easyr1_with_the_batch_size():
    # EasyR1 updates with n_steps = samples in the batch: 100 steps of 512 samples at 10x the target -> x2.77
    controller = make_kl_controller("adaptive", 0.01, target_kl=0.1, horizon=10000)
    for _ in range(100):
        controller.update(1.0, 512)
    assert controller.value / 0.01 == pytest.approx((1 + 0.2 * 512 / 10000) ** 100, rel=1e-9)
    assert controller.value / 0.01 == pytest.approx(2.77, abs=0.01)


def test_latent_log_density_is_the_gaussian_log_density_and_gives_a_true_kl():
    from monet_models.transformers import latent_log_density

    torch.manual_seed(0)
    mu, mu_ref, z = torch.randn(3, 16), torch.randn(3, 16), torch.randn(3, 16)
    for sigma in (0.5, 3.0):
        expected = torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1) + 16 * 0.5 * math.log(2 * math.pi)
        assert torch.allclose(latent_log_density(z, mu, sigma), expected, atol=1e-4)
        assert torch.allclose(latent_log_density(z, mu, sigma, scale_by_dim=True), expected / 16, atol=1e-5)
    # E_z~π[log π − log π_ref] with different σ matches the analytic Gaussian KL
    sigma, sigma_ref = 1.0, 2.0
    samples = mu[0] + sigma * torch.randn(200_000, 16)
    k1 = (latent_log_density(samples, mu[0], sigma) - latent_log_density(samples, mu_ref[0], sigma_ref)).mean()
    analytic = torch.distributions.kl_divergence(torch.distributions.Normal(mu[0], sigma),
                                                 torch.distributions.Normal(mu_ref[0], sigma_ref)).sum()
    assert k1.item() == pytest.approx(analytic.item(), rel=0.02)


def test_kl_controllers():
    fixed = FixedKLController(0.01)
    fixed.update(5.0, 100)
    assert fixed.value == 0.01
    up = AdaptiveKLController(0.1, target_kl=0.1, horizon=100)
    up.update(1.0, 10)  # error clipped to +0.2 -> * 1.02
    assert up.value == pytest.approx(0.1 * 1.02)
    down = AdaptiveKLController(0.1, target_kl=0.1, horizon=100)
    down.update(0.09, 10)  # error -0.1 -> * 0.99
    assert down.value == pytest.approx(0.1 * 0.99)
    restored = make_kl_controller("adaptive", 0.5, target_kl=0.3, horizon=7)
    restored.load_state_dict(up.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (up.value, 0.1, 100)
    f2 = FixedKLController(0.0)
    f2.load_state_dict(fixed.state_dict())
    assert f2.value == 0.01
    with pytest.raises(ValueError):
        make_kl_controller("pid")


# ---------------------------------------------------------------- aggregation

def test_token_mean_global_count_over_micro_batches():
    torch.manual_seed(0)
    loss = torch.randn(6, 8)
    mask = _mask([8, 1, 5, 3, 7, 2], 8)
    full = aggregate_loss(loss, mask, "token-mean")
    assert torch.allclose(full, (loss * mask).sum() / mask.sum())
    total = mask.sum()
    parts = [aggregate_loss(loss[s], mask[s], "token-mean", global_token_count=total) for s in (slice(0, 2), slice(2, 6))]
    assert torch.allclose(sum(parts), full)
    # without the global count the micro-batch means do not add up to the global mean
    naive = sum(aggregate_loss(loss[s], mask[s], "token-mean") for s in (slice(0, 2), slice(2, 6))) / 2
    assert not torch.allclose(naive, full)


def test_seq_modes_and_unknown_mode():
    loss = torch.tensor([[1.0, 3.0, 100.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((4.0 + 4.0) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean", global_seq_count=4).item() == pytest.approx(1.5)
    assert aggregate_loss(loss, torch.zeros_like(mask), "token-mean").item() == 0.0
    with pytest.raises(ValueError, match="unknown loss aggregation mode"):
        aggregate_loss(loss, mask, "token-sum")


def test_masked_mean_ignores_nan_outside_mask_and_whiten():
    values = torch.tensor([[1.0, float("nan")], [3.0, 5.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert masked_mean(values, mask).item() == pytest.approx(3.0)
    assert torch.allclose(masked_mean(values, mask, dim=-1), torch.tensor([1.0, 4.0]))
    w = masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert torch.allclose(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4)


# ---------------------------------------------------------------- EasyR1's other estimators, value loss, loss types
# Held out: each expected value is written here from EasyR1's formulas (verl/trainer/core_algos.py) in plain
# Python over lists, never by calling this project's code.

def _easyr1_gae_row(rewards, values, mask, gamma, lam):
    """EasyR1's compute_gae_advantage_return for one row (its `if response_mask[:, t]` is only defined for one row):
    masked-out positions pass the next value and the running advantage through. Returns (raw advantages, returns)."""
    next_value, last, out = 0.0, 0.0, []
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        candidate = delta + gamma * lam * last
        if mask[t]:
            next_value, last = values[t], candidate
        out.append(last)
    advantages = out[::-1]
    return advantages, [a + v for a, v in zip(advantages, values)]


def _whiten(rows, masks):
    """verl's masked_whiten: (x − mean)·rsqrt(unbiased var + 1e-8) over all masked entries."""
    flat = [x for row, mask in zip(rows, masks) for x, m in zip(row, mask) if m]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    return [[(x - mean) / math.sqrt(var + 1e-8) for x in row] for row in rows]


def test_gae_matches_easyr1_formula_with_a_skipped_forced_end_token_and_kl_in_reward():
    torch.manual_seed(0)
    masks = [[1, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]  # row 0: a forced </abs_vis_token> at 2
    scores, gamma, lam, kl_coef = [1.0, -0.5, 0.25], 0.9, 0.8, 0.1
    values = torch.randn(3, 6, dtype=torch.float64)
    kl = torch.rand(3, 6, dtype=torch.float64)
    adv, ret = compute_advantages("gae", torch.tensor(scores, dtype=torch.float64), torch.tensor(masks).double(),
                                  ["a", "b", "c"], values=values, gamma=gamma, lam=lam, kl=kl, kl_coef=kl_coef)
    raw, expected_returns = [], []
    for row, mask in enumerate(masks):
        last = max(t for t, m in enumerate(mask) if m)
        rewards = [(scores[row] if t == last else 0.0) * mask[t] - kl_coef * kl[row, t].item() * mask[t]
                   for t in range(6)]
        row_values = [values[row, t].item() * mask[t] for t in range(6)]  # EasyR1's values are masked
        a, r = _easyr1_gae_row(rewards, row_values, mask, gamma, lam)
        raw.append(a)
        expected_returns.append([x * m for x, m in zip(r, mask)])
    expected = [[x * m for x, m in zip(row, mask)] for row, mask in zip(_whiten(raw, masks), masks)]
    assert torch.allclose(adv, torch.tensor(expected, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(ret, torch.tensor(expected_returns, dtype=torch.float64), atol=1e-9)
    # the forced end token is transparent: position 1's TD error looks through it to position 3's value
    assert raw[0][1] == pytest.approx(-kl_coef * kl[0, 1].item() + gamma * values[0, 3].item() - values[0, 1].item()
                                      + gamma * lam * raw[0][3], abs=1e-12)


def test_value_loss_matches_easyr1_clipped_formula():
    torch.manual_seed(1)
    new, returns, old = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64), \
        torch.randn(2, 5, dtype=torch.float64)
    mask = _mask([5, 3], 5).double()
    clip = 0.3
    per_token, metrics = compute_value_loss(new, returns, old, mask, clip)
    total, count, clipped, vsum = 0.0, 0, 0, 0.0
    for i in range(2):
        for t in range(5):
            if not mask[i, t]:
                continue
            v, r, o = new[i, t].item(), returns[i, t].item(), old[i, t].item()
            v_clip = min(max(v, o - clip), o + clip)
            loss1, loss2 = (v - r) ** 2, (v_clip - r) ** 2
            total, count = total + max(loss1, loss2), count + 1
            clipped += loss1 < loss2
            vsum += v
    assert float(aggregate_loss(per_token, mask, "token-mean")) == pytest.approx(0.5 * total / count, abs=1e-9)
    assert metrics["vf_clipfrac"] == pytest.approx(clipped / count) and 0 < clipped < count
    assert metrics["vpred_mean"] == pytest.approx(vsum / count)
    assert torch.all(per_token[mask == 0] == 0)


def test_remax_and_grpo_passk_match_easyr1():
    mask = _mask([3, 2, 4, 1], 4)
    scores, baselines = [1.0, 0.2, 0.7, 0.0], [0.5, 0.5, 0.9, 0.9]  # baseline: the prompt's greedy reward
    adv, ret = compute_advantages("remax", scores, mask, ["a", "a", "b", "b"], reward_baselines=baselines)
    expected_adv = [[(s - b) * m for m in row] for s, b, row in zip(scores, baselines, mask.tolist())]
    last = [2, 1, 3, 0]
    expected_ret = [[s if t <= last[i] else 0.0 for t in range(4)] for i, s in enumerate(scores)]  # reward-to-go
    assert torch.allclose(adv, torch.tensor(expected_adv)) and torch.allclose(ret, torch.tensor(expected_ret))

    group = [0.2, 0.9, 0.5, 0.9, 0.1, 0.6]  # two of a group tie for the best: the runner-up equals it
    adv, _ = compute_advantages("grpo_passk", group, torch.ones(6, 2), ["a", "a", "a", "b", "b", "b"])
    std_b = float(np.std([0.9, 0.1, 0.6], ddof=1))
    expected = [0.0, (0.9 - 0.5) / (float(np.std([0.2, 0.9, 0.5], ddof=1)) + 1e-6), 0.0,
                (0.9 - 0.6) / (std_b + 1e-6), 0.0, 0.0]
    assert torch.allclose(adv[:, 0], torch.tensor(expected), atol=1e-6)
    adv, _ = compute_advantages("grpo_passk", [1.0, 1.0, 0.0], torch.ones(3, 2), ["a"] * 3)
    assert torch.all(adv == 0)  # a tie at the top: no margin


def test_policy_loss_types_match_easyr1_formulas():
    torch.manual_seed(2)
    logp, old, adv = torch.randn(2, 4, dtype=torch.float64) * 0.3, torch.randn(2, 4, dtype=torch.float64) * 0.3, \
        torch.randn(2, 4, dtype=torch.float64)
    mask = _mask([4, 3], 4).double()
    lo, hi = 0.2, 0.3
    for loss_type in ("gspo", "cispo", "sapo"):
        loss, _ = compute_policy_loss(logp, old, adv, mask, lo, hi, 3.0, loss_type, 1.0, 1.05)
        for i in range(2):
            seq = sum((logp[i, t] - old[i, t]).item() for t in range(4) if mask[i, t]) / mask[i].sum().item()
            for t in range(4):
                if not mask[i, t]:
                    assert loss[i, t] == 0
                    continue
                a, lr = adv[i, t].item(), (logp[i, t] - old[i, t]).item()
                ratio = math.exp(seq if loss_type == "gspo" else lr)
                clipped = min(max(ratio, 1 - lo), 1 + hi)
                if loss_type == "gspo":
                    pg = max(-a * ratio, -a * clipped)
                    expected = min(pg, -a * 3.0) if a < 0 else pg
                elif loss_type == "cispo":
                    expected = -a * logp[i, t].item() * clipped
                else:
                    tau = 1.0 if a >= 0 else 1.05
                    expected = -a * 4.0 / tau / (1 + math.exp(-tau * (ratio - 1.0)))
                assert loss[i, t].item() == pytest.approx(expected, abs=1e-9), (loss_type, i, t)


def test_chunked_entropy_equals_the_full_softmax_entropy_with_gradients():
    torch.manual_seed(3)
    head = torch.nn.Linear(8, 11, dtype=torch.float64)
    hidden = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    chunked = chunked_entropy(head, hidden, temperature=0.7, chunk_size=3)
    probs = torch.softmax(head(hidden) / 0.7, -1)
    full = -(probs * probs.log()).sum(-1)
    assert torch.allclose(chunked, full, atol=1e-12)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), hidden)
    (grad_full,) = torch.autograd.grad(full.sum(), hidden)
    assert torch.allclose(grad_chunked, grad_full, atol=1e-10)
