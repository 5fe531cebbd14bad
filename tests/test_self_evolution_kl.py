"""Self-evolution's released KL options on a LoRA solver in one process (a world of one, gloo; no Ray), against a
hand computation: the full-vocabulary KL, its gradient, and β moved after every optimizer step; the policy runs one
forward per micro-batch for the loss and the full-vocabulary KL together."""
import copy
import math

import pytest
import torch

from RL.config import load_config
from algorithms.kl import ExponentialKLController
from monet_models.transformers import load_latent_model
from tests.helpers import latent_rollout_batch
from workers.actor.policy import Policy
from workers.actor.self_evolution_updates import full_kl_ppo_loss, self_evolution_update
from workers.actor.sharded_model import ShardedModel
from workers.actor.updates import GlobalCounts

BETA = 0.5


@pytest.fixture(scope="module")
def solver_and_batch(process_group, tiny_model_dir):
    """A LoRA solver whose adapter is moved off zero (so it differs from the base, the reference), and two rollouts
    of the base model with latent blocks, scored as the trainer scores them."""
    config = load_config(["config=examples/config/ireasoner_tiny_cpu.yaml",
                          f"worker.actor.model.model_path={tiny_model_dir}", "worker.actor.model.lora.dropout=0.0",
                          "worker.actor.loss_avg_mode=seq", "worker.actor.padding_free=true",
                          "worker.actor.micro_batch_size_per_device_for_update=2"], require_inputs=False)
    cfg = config.worker.actor
    model = ShardedModel(tiny_model_dir, cfg, trainable=True, adapters=["solver"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.module.named_parameters():
            if "lora_B" in name:
                param.to_local().copy_(0.2 * torch.randn(param.to_local().shape, generator=generator))
    solver = Policy.build("solver", model, "solver", cfg.optim, total_steps=4)
    base, processor = load_latent_model(tiny_model_dir)
    batch = latent_rollout_batch(base, processor, "Which shape?", n=1, max_new_tokens=10, latent_size=2)
    batch.tensors["old_log_probs"], _ = model.score_with_means(batch, cfg.monet_rl_sigma, "solver")
    batch.tensors["ref_log_probs"], batch.tensors["ref_latent_means"] = model.score_with_means(
        batch, cfg.monet_rl_sigma, None)
    batch.tensors["advantages"] = torch.zeros_like(batch.tensors["old_log_probs"])  # the KL term alone moves
    return solver, batch, cfg


def hand_kl(solver, batch, cfg, rows) -> torch.Tensor:
    """Per sample: the mean over its response positions of Σ_v p(v)(log p(v) − log q(v)) at text positions and
    ‖μ − μ_ref‖²/(2σ²) at latent ones (/D with latent_logprob_scale=dim), from full padded logits and hidden states; then the mean over samples."""
    model = solver.model
    pad = model.latent_pad_id

    def forward(adapter):
        with model.use(adapter):
            latents = [x for x in batch.non_tensors["latents"][rows] if x is not None and len(x)]
            out = model.module(input_ids=batch.tensors["input_ids"][rows],
                               attention_mask=batch.tensors["attention_mask"][rows],
                               pixel_values=torch.cat(list(batch.non_tensors["pixel_values"][rows])),
                               image_grid_thw=torch.cat(list(batch.non_tensors["image_grid_thw"][rows])),
                               latent_embeds=torch.cat(latents) if latents else None, latent_mode=True)
        return out.logits.double().log_softmax(-1), out.hidden_states.double()

    with torch.no_grad():
        ref_logp, ref_hidden = forward(None)
    logp, hidden = forward("solver")
    ids = batch.tensors["input_ids"][rows]
    responses, mask = batch.tensors["responses"][rows], batch.tensors["response_mask"][rows]
    start = ids.shape[1] - responses.shape[1]
    per_sample = []
    for b in range(ids.shape[0]):
        values = []
        for j in range(responses.shape[1]):
            if not mask[b, j]:
                continue
            t = start + j  # token t is predicted at t − 1
            if responses[b, j] == pad:
                gaussian = (hidden[b, t - 1] - ref_hidden[b, t - 1]).pow(2).sum() / (2 * cfg.monet_rl_sigma ** 2)
                values.append(gaussian / (hidden.shape[-1] if cfg.latent_logprob_scale == "dim" else 1))
            else:
                p = logp[b, t - 1]
                values.append((p.exp() * (p - ref_logp[b, t - 1])).sum())
        per_sample.append(torch.stack(values).mean())
    return torch.stack(per_sample).mean()


def test_full_vocabulary_kl_and_its_gradient_equal_the_hand_computation(solver_and_batch):
    solver, batch, cfg = solver_and_batch
    counts = GlobalCounts.of(batch.tensors["response_mask"].float())
    with solver.active():
        loss, shares, _ = full_kl_ppo_loss(solver, batch, counts, cfg, BETA, reference=solver.model)
        solver.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        got = {id(p): p.grad.to_local().clone() for p in solver.parameters() if p.grad is not None}
        solver.optimizer.zero_grad(set_to_none=True)
        expected = hand_kl(solver, batch, cfg, slice(None))
        (BETA * expected).backward()
        want = {id(p): p.grad.to_local().clone() for p in solver.parameters() if p.grad is not None}
        solver.optimizer.zero_grad(set_to_none=True)
    expected = expected.detach()
    assert float(expected) > 1e-4
    assert float(shares["actor/kl_loss"]) == pytest.approx(float(expected), rel=1e-4)
    assert float(loss.detach()) == pytest.approx(float(shares["actor/pg_loss"]) + BETA * float(expected), rel=1e-4)
    assert "actor/kl_sampled" in shares  # the sampled-token estimate stays a metric
    assert set(got) == set(want) and len(want) > 0
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 0 and max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-4 * scale


def test_beta_moves_after_every_optimizer_step(solver_and_batch):
    """Two samples, one optimizer step each, lr 0 (the weights, hence each step's KL, are known in advance): β after
    = the controller applied to sample 1's KL, then to sample 2's; per update it would move once, on their mean."""
    solver, batch, cfg = solver_and_batch
    cfg = copy.deepcopy(cfg)
    cfg.micro_batch_size_per_device_for_update = 1
    for group in solver.optimizer.param_groups:
        group["lr"] = 0.0
    with torch.no_grad(), solver.active():
        kls = [float(hand_kl(solver, batch, cfg, slice(i, i + 1))) for i in range(2)]
    controller = ExponentialKLController(BETA, 0.02, 0.1)
    forwards = []  # grad mode of each forward: the policy's run with gradients, the reference's without
    hook = solver.model.module.register_forward_hook(lambda *_: forwards.append(torch.is_grad_enabled()))
    try:
        metrics = self_evolution_update(solver, batch, cfg, 1, BETA, reference=solver.model, controller=controller)
    finally:
        hook.remove()
    assert forwards.count(True) == 2 and forwards.count(False) == 2  # one policy forward per micro-batch (2 of 1)
    beta = BETA
    for kl in kls:
        beta = min(max(beta * math.exp(0.1 * (kl - 0.02) / 0.02), 1e-8), 100.0)
    assert metrics["actor/kl_coef_after"] == pytest.approx(beta, rel=1e-4) and controller.value == metrics[
        "actor/kl_coef_after"]
    assert metrics["actor/kl_loss"] == pytest.approx(sum(kls) / 2, rel=1e-4)
    once = BETA * math.exp(0.1 * (sum(kls) / 2 - 0.02) / 0.02)
    assert abs(once - beta) > 1e-3 * beta  # the released schedule is not the once-per-update one
