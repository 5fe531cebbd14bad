"""Update rules: functions applied to a `Policy`, one loss composer per objective.

Every rule reads forward → loss → backward → step (CleanRL's shape). `optimizer_step` owns what all objectives share:
gradient accumulation over micro-batches with the exact global mean over micro-batches and ranks, one global
gradient norm, and skipping a step whose norm is not finite. A loss composer turns one micro-batch into
(loss, metrics); its loss is this micro-batch's share of the global mean, so the shares add up to the mean.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from algorithms import aggregate_loss, compute_kl, compute_policy_loss, with_exact_latent_kl
from workers.actor.fsdp import all_reduce_sum
from workers.actor.model_inputs import micro_batches
from workers.actor.optimizers import clip_grad_norm
from workers.actor.policy import Policy

LOSS_MODES = {"token": "token-mean", "seq": "seq-mean-token-mean"}


@dataclass(frozen=True)
class GlobalCounts:
    """Response tokens and sequences of the whole mini-batch, over every micro-batch and rank."""

    tokens: torch.Tensor
    sequences: torch.Tensor

    @classmethod
    def of(cls, mask: torch.Tensor) -> "GlobalCounts":
        return cls(all_reduce_sum(mask.sum()), all_reduce_sum((mask.sum(-1) > 0).sum()))

    def mean(self, values: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """This micro-batch's share of the global `mode` mean of per-position `values`."""
        return aggregate_loss(values, mask, LOSS_MODES[mode], self.tokens, self.sequences)


# (policy, micro-batch, counts) -> (loss share, metric shares summed over micro-batches and ranks, metric means)
LossFn = Callable[[Policy, object, GlobalCounts], tuple[torch.Tensor, dict, dict]]


def optimizer_step(policy: Policy, mini, loss_fn: LossFn, micro_size: int, max_grad_norm: float,
                   max_tokens: int = 0, padding_free: bool = True) -> dict:
    """One optimizer step over the mini-batch `mini` (this rank's share), accumulated over micro-batches of
    `micro_size` samples, or of at most `max_tokens` tokens when > 0 (`model_inputs.micro_batches`)."""
    counts = GlobalCounts.of(mini.tensors["response_mask"].float())
    world = dist.get_world_size()
    shares, means = defaultdict(float), defaultdict(list)
    with policy.active():
        for micro in micro_batches(mini, micro_size, max_tokens, padding_free):
            loss, micro_shares, micro_means = loss_fn(policy, micro, counts)
            # FSDP averages gradients over ranks; scaling by the world size turns that into the global mean.
            (loss * world).backward()
            for key, value in micro_shares.items():
                shares[key] += float(value)
            for key, value in micro_means.items():
                means[key].append(float(value))
    metrics = {key: float(all_reduce_sum(value)) for key, value in shares.items()}
    metrics.update({key: sum(values) / len(values) for key, values in means.items()})
    grad_norm = clip_grad_norm(policy.parameters(), max_grad_norm)
    if math.isfinite(grad_norm):
        policy.optimizer.step()
    else:
        metrics["actor/skipped_steps"] = 1.0
    policy.optimizer.zero_grad(set_to_none=True)
    metrics["actor/grad_norm"] = grad_norm
    return metrics


def run_epochs(policy: Policy, batch, mini_batch_size: int, epochs: int, step_fn: Callable) -> dict:
    """`epochs` passes over `batch` in mini-batches (one optimizer step each), then one scheduler step."""
    policy.model.module.train()
    collected = defaultdict(list)
    for _ in range(epochs):
        for mini in batch.split(mini_batch_size):
            for key, value in step_fn(mini).items():
                collected[key].append(value)
    policy.scheduler.step()
    summary = {key: sum(values) / len(values) for key, values in collected.items()}
    summary["actor/lr"] = policy.scheduler.get_last_lr()[0]
    return summary


# ---- PPO / GRPO with the latent Gaussian terms (VLPO, and the self-evolution roles) -----------------------------
def ppo_loss(policy: Policy, micro, counts: GlobalCounts, cfg, kl_coef: float, scores: tuple | None = None):
    """Policy loss (`worker.actor.loss_type`) over text and latent positions, plus the KL loss to the reference,
    minus `entropy_coeff` times the text positions' entropy (latent positions count as 0: their Gaussian entropy
    is a constant of σ). `scores`: the micro-batch's `ShardedModel.scores` (with the entropy when entropy_coeff > 0)
    from a forward the caller already ran; None runs it here."""
    log_probs, means, *entropy = scores or policy.model.scores(micro, cfg.monet_rl_sigma,
                                                               entropy=cfg.entropy_coeff > 0)
    device = log_probs.device
    mask = micro.tensors["response_mask"].to(device).float()
    pg_tokens, pg_metrics = compute_policy_loss(
        log_probs, micro.tensors["old_log_probs"].to(device), micro.tensors["advantages"].to(device), mask,
        cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_dual, cfg.loss_type, cfg.tau_positive,
        cfg.tau_negative)
    loss = pg_loss = counts.mean(pg_tokens, mask, cfg.loss_avg_mode)
    shares = {"actor/pg_loss": pg_loss.detach()}
    if entropy:
        text = micro.tensors["responses"].to(device) != policy.model.latent_pad_id
        bonus = counts.mean(entropy[0] * text, mask, cfg.loss_avg_mode)
        loss = loss - cfg.entropy_coeff * bonus
        shares["actor/entropy_bonus"] = bonus.detach()
    if cfg.use_kl_loss and "ref_log_probs" in micro.tensors.keys():
        latent_mask = micro.tensors["responses"].to(device) == policy.model.latent_pad_id
        per_position = reference_kl(cfg.kl_penalty, cfg, latent_mask, log_probs, means,
                                    micro.tensors["ref_log_probs"].to(device),
                                    latent_rows(micro.tensors["ref_latent_means"].to(device), latent_mask))
        kl = counts.mean(per_position, mask, cfg.loss_avg_mode)
        loss = loss + kl_coef * kl
        shares["actor/kl_loss"] = kl.detach()
    return loss, shares, {f"actor/{key}": value for key, value in pg_metrics.items()}


def reference_kl(estimator: str, cfg, latent_mask: torch.Tensor, log_probs: torch.Tensor, means: torch.Tensor,
                 ref_log_probs: torch.Tensor, ref_means: torch.Tensor) -> torch.Tensor:
    """Per-position KL to the reference (B, T): `estimator`'s (algorithm.kl_penalty) estimate at text positions,
    the exact Gaussian KL from the (latents, D) means at latent ones (docs/design.md, the VLPO objective)."""
    return with_exact_latent_kl(compute_kl(log_probs, ref_log_probs, estimator), latent_mask, means, ref_means,
                                cfg.monet_rl_sigma, cfg.ref_monet_rl_sigma, cfg.latent_logprob_scale == "dim")


def latent_rows(padded: torch.Tensor, latent_mask: torch.Tensor) -> torch.Tensor:
    """(latents, D) in `latent_mask`'s row-major order from (B, M, D) means zero-padded per sample."""
    counts = latent_mask.sum(-1).to(padded.device)
    return padded[torch.arange(padded.shape[1], device=padded.device)[None] < counts[:, None]]


def ppo_update(policy: Policy, batch, cfg, mini_batch_size: int, kl_coef: float) -> dict:
    """PPO epochs over mini-batches of micro-batches. `kl_coef` comes from the driver's KL controller.

    `mini_batch_size=1` is one optimizer step per sample (per rank), the released iReasoner behaviour, here still
    with the PPO ratio against the behaviour log-probs.
    """
    loss_fn = lambda pol, micro, counts: ppo_loss(pol, micro, counts, cfg, kl_coef)  # noqa: E731
    micro_size, budget = cfg.micro_batch_size_per_device_for_update, cfg.token_budget(update=True)
    return run_epochs(policy, batch, mini_batch_size, cfg.ppo_epochs,
                      lambda mini: optimizer_step(policy, mini, loss_fn, micro_size, cfg.max_grad_norm, budget,
                                                  cfg.padding_free))
