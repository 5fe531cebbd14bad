"""Self-evolution's update with the released iReasoner options (self_evolution.kl, self_evolution.kl_coef_update).

- `kl=full`: the KL term is the exact KL(π_θ‖π_ref) over the whole vocabulary at each response text position
  (`algorithms.kl.full_vocab_kl`), the exact Gaussian KL at latent positions as always; the reference's
  distributions come from one no-grad forward per micro-batch (the base with the adapters disabled, or the frozen
  copy), the policy's from one more forward with gradients. The sampled-token estimate stays a metric
  (`actor/kl_sampled`).
- `kl_coef_update=per_step`: β moves after every optimizer step with that step's KL (all ranks see the same
  all-reduced KL, so they move it alike), instead of once per role update.
"""
from __future__ import annotations

from functools import partial

import torch

from algorithms.kl import ExponentialKLController, full_vocab_kl, with_exact_latent_kl
from monet_models.transformers.log_probs import latent_means
from monet_models.transformers.packing import pack, unpack
from workers.actor.model_inputs import model_inputs, token_budget, unwrapped
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
                                 cfg.max_grad_norm, token_budget(cfg, update=True), cfg.padding_free)
        if controller is not None:
            controller.update(metrics.get("actor/kl_loss", 0.0))
            beta[0] = controller.value
        return metrics

    summary = run_epochs(policy, batch, mini_batch_size, cfg.ppo_epochs, step)
    summary["actor/kl_coef_after"] = beta[0]
    return summary


def full_kl_ppo_loss(policy: Policy, micro, counts: GlobalCounts, cfg, kl_coef: float, reference):
    """`ppo_loss` whose KL term is the exact one: Σ_v π(v)(log π(v) − log π_ref(v)) at text positions."""
    device = policy.model.device
    inputs = model_inputs(micro, device)
    want = text_positions(micro, device, policy.model.latent_pad_id)
    with torch.no_grad(), reference.use(None):  # first: switching adapters must not happen inside the policy's graph
        ref_rows, _, _ = _forward(reference.module, inputs, want, cfg, partial(_log_distributions,
                                                                                temperature=cfg.temperature))
    loss, shares, metrics = ppo_loss(policy, micro, counts, cfg, 0.0)  # its sampled KL: a metric only
    if "actor/kl_loss" in shares:
        shares["actor/kl_sampled"] = shares.pop("actor/kl_loss")
    if not cfg.use_kl_loss:
        return loss, shares, metrics
    text_kl, means, keep_out = _forward(policy.model.module, inputs, want, cfg,
                                        partial(_kl_rows, ref_rows=ref_rows, temperature=cfg.temperature))
    responses = micro.tensors["responses"].to(device)
    latent_mask = responses == policy.model.latent_pad_id
    per_position = with_exact_latent_kl(
        keep_out[:, -responses.shape[1]:], latent_mask, means,
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


def _forward(module, inputs: dict, want: torch.Tensor, cfg, head) -> tuple:
    """(head's rows at the `want` positions, latent means, head rows scattered to (B, L) when they are per-position
    values) of one latent-aware forward, padded or packed like the actor's scores."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    common = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                  latent_embeds=inputs["latent_embeds"], latent_mode=True)
    keep = None
    if cfg.padding_free:
        positions, _ = unwrapped(module).mrope_positions(ids, mask, inputs["image_grid_thw"])
        ids, positions, keep = pack(ids, mask, positions)
        want = want[keep][None]
        common.update(position_ids=positions)
    else:
        common.update(attention_mask=mask)
    # token t is predicted from the hidden state at t − 1: the rows of hidden[:, :-1] whose next token is wanted
    out = module(input_ids=ids, head=partial(head, rows=want[:, 1:].reshape(-1)), **common)
    rows = out.head_output
    means = latent_means(out.hidden_states, ids, unwrapped(module).latent_tokens.pad)
    if rows.dim() != 1:
        return rows, means, None
    values = torch.zeros(want.shape, dtype=rows.dtype, device=rows.device).masked_scatter(want, rows)
    return rows, means, unpack(values[..., None], keep)[..., 0] if keep is not None else values


def _log_distributions(hidden: torch.Tensor, lm_head, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """(wanted positions, V) fp32 log-softmax of the next-token logits at temperature."""
    selected = hidden[:, :-1].reshape(-1, hidden.shape[-1])[rows]
    return torch.log_softmax(lm_head(selected).float() / temperature, dim=-1)


def _kl_rows(hidden: torch.Tensor, lm_head, rows: torch.Tensor, ref_rows: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """(wanted positions,) exact KL of the policy's next-token distribution to the reference's."""
    return full_vocab_kl(_log_distributions(hidden, lm_head, rows, temperature), ref_rows)
