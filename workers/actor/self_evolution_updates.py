"""Self-evolution's update with the released iReasoner options (self_evolution.kl, self_evolution.kl_coef_update).

- `kl=full`: the KL term is the exact KL(π_θ‖π_ref) over the whole vocabulary at each response text position
  (`algorithms.kl.full_vocab_kl`), the exact Gaussian KL at latent positions as always; the reference's
  distributions come from one no-grad forward per micro-batch that computes only them (`ShardedModel.rows`; the
  base with the adapters disabled, or the frozen copy), and the policy's one forward with gradients gives both the
  loss's log-probs and the KL rows (a second head on `ShardedModel.scores`). The sampled-token estimate stays a metric (`actor/kl_sampled`).
- `kl_coef_update=per_step`: β moves after every optimizer step with that step's KL (all ranks see the same
  all-reduced KL, so they move it alike), instead of once per role update.
"""
from __future__ import annotations

from functools import partial

import torch

from algorithms.kl import ExponentialKLController, full_vocab_kl, with_exact_latent_kl
from workers.actor.policy import Policy
from workers.actor.updates import GlobalCounts, latent_rows, optimizer_step, ppo_loss, run_epochs


def self_evolution_update(policy: Policy, batch, cfg, mini_batch_size: int, kl_coef: float, reference=None,
                          controller: ExponentialKLController | None = None) -> dict:
    """`ppo_update` with the full-vocabulary KL when `reference` (a ShardedModel) is given and β moved by
    `controller` after every optimizer step when given; `actor/kl_coef_after` is β at the end."""
    beta = [kl_coef]

    def loss_fn(pol, micro, counts):
        if reference is None:
            return ppo_loss(pol, micro, counts, cfg, beta[0])
        return full_kl_ppo_loss(pol, micro, counts, cfg, beta[0], reference)

    def step(mini) -> dict:
        metrics = optimizer_step(policy, mini, loss_fn, cfg.micro_batch_size_per_device_for_update,
                                 cfg.max_grad_norm, cfg.token_budget(update=True), cfg.padding_free)
        if controller is not None:
            controller.update(metrics.get("actor/kl_loss", 0.0))
            beta[0] = controller.value
        return metrics

    summary = run_epochs(policy, batch, mini_batch_size, cfg.ppo_epochs, step)
    summary["actor/kl_coef_after"] = beta[0]
    return summary


def full_kl_ppo_loss(policy: Policy, micro, counts: GlobalCounts, cfg, kl_coef: float, reference):
    """`ppo_loss` whose KL term is the exact one: Σ_v π(v)(log π(v) − log π_ref(v)) at text positions."""
    if not cfg.use_kl_loss:
        return ppo_loss(policy, micro, counts, cfg, 0.0)
    device = policy.model.device
    want = text_positions(micro, device, policy.model.latent_pad_id)
    temperature = cfg.temperature
    with torch.no_grad(), reference.use(None):  # first: switching adapters must not happen inside the policy's graph
        ref_rows = reference.rows(micro, partial(_log_distributions, temperature=temperature), want)
    *scores, text_kl = policy.model.scores(micro, cfg.monet_rl_sigma, entropy=cfg.entropy_coeff > 0, rows_head=partial(
        _kl_rows, ref_rows=ref_rows, temperature=temperature), wanted=want)
    loss, shares, metrics = ppo_loss(policy, micro, counts, cfg, 0.0, tuple(scores))  # its sampled KL: a metric only
    if "actor/kl_loss" in shares:
        shares["actor/kl_sampled"] = shares.pop("actor/kl_loss")
    responses = micro.tensors["responses"].to(device)
    latent_mask = responses == policy.model.latent_pad_id
    text_kl = torch.zeros(want.shape, dtype=text_kl.dtype, device=device).masked_scatter(want, text_kl)
    per_position = with_exact_latent_kl(
        text_kl[:, -responses.shape[1]:], latent_mask, scores[1],
        latent_rows(micro.tensors["ref_latent_means"].to(device), latent_mask), cfg.monet_rl_sigma,
        cfg.ref_monet_rl_sigma, cfg.latent_logprob_scale == "dim")
    mask = micro.tensors["response_mask"].to(device).float()
    kl = counts.mean(per_position, mask, cfg.loss_avg_mode)
    shares["actor/kl_loss"] = kl.detach()
    return loss + kl_coef * kl, shares, metrics


def text_positions(micro, device, latent_pad_id: int) -> torch.Tensor:
    """(B, L) bool: the input positions holding a response text token (the ones a text KL is taken at)."""
    ids = micro.tensors["input_ids"].to(device)
    responses = micro.tensors["responses"].to(device)
    text = micro.tensors["response_mask"].to(device).bool() & (responses != latent_pad_id)
    want = torch.zeros_like(ids, dtype=torch.bool)
    want[:, -responses.shape[1]:] = text
    return want


def _log_distributions(hidden: torch.Tensor, lm_head, temperature: float) -> torch.Tensor:
    """(rows, V) fp32 log-softmax of the next-token logits at temperature from the rows' (rows, H) hidden states."""
    return torch.log_softmax(lm_head(hidden).float() / temperature, dim=-1)


def _kl_rows(hidden: torch.Tensor, lm_head, ref_rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """(rows,) exact KL of the policy's next-token distribution to the reference's."""
    return full_vocab_kl(_log_distributions(hidden, lm_head, temperature), ref_rows)
