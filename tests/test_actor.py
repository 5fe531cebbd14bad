"""The FSDP2 policy in one process (a world of one, gloo): log-probs agree with the rollout, bad steps are skipped,
and the loss is the exact global mean however the batch is cut into micro-batches."""

import pytest
import torch

from RL.config import load_config
from monet_models.transformers import load_latent_model
from tests.helpers import latent_rollout_batch
from workers.actor.fsdp import full_tensor
from workers.actor.policy import Policy
from workers.actor.sharded_model import ShardedModel
from workers.actor.updates import ppo_update


@pytest.fixture(scope="module")
def actor_and_batch(process_group, tiny_model_dir, toy_data_dir):
    config = load_config([
        "config=examples/config/vlpo_tiny_cpu.yaml", f"worker.actor.model.model_path={tiny_model_dir}",
        f"data.train_files={toy_data_dir}/train.jsonl", "worker.rollout.latent_size=3",
        "worker.actor.micro_batch_size_per_device_for_update=2"])
    model = ShardedModel(tiny_model_dir, config.worker.actor, trainable=True)
    actor = Policy.build("actor", model, None, config.worker.actor.optim, total_steps=4)
    model, processor = load_latent_model(tiny_model_dir)
    batch = latent_rollout_batch(model, processor, "Which shape?", n=2, max_new_tokens=12, latent_size=3)
    return actor, batch, config.worker.actor


def test_actor_log_probs_match_the_rollout(actor_and_batch):
    actor, batch, _ = actor_and_batch
    log_probs = actor.model.score(batch, sigma=1.0, adapter=None)
    sampled = batch.tensors["rollout_log_probs"] != 0
    assert (log_probs - batch.tensors["rollout_log_probs"])[sampled].abs().max() < 1e-4
    latent = batch.tensors["responses"] == actor.model.module.latent_tokens.pad
    assert latent.any() and log_probs[latent].abs().max() < 1e-4  # noise-free latents sit at the mean


def test_non_finite_gradient_skips_the_step_and_a_finite_one_updates(actor_and_batch):
    actor, batch, cfg = actor_and_batch
    batch.tensors["old_log_probs"], batch.tensors["ref_latent_means"] = actor.model.score_with_means(
        batch, sigma=cfg.monet_rl_sigma, adapter=None)  # the reference: the actor itself, with its latent means
    batch.tensors["ref_log_probs"] = batch.tensors["old_log_probs"].clone()
    weights = lambda: {k: full_tensor(v.detach()).clone() for k, v in actor.model.module.named_parameters()}  # noqa: E731
    before = weights()
    batch.tensors["advantages"] = torch.full_like(batch.tensors["old_log_probs"], float("nan"))
    metrics = ppo_update(actor, batch, cfg, mini_batch_size=len(batch), kl_coef=0.05)
    assert metrics["actor/skipped_steps"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in weights().items())

    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None].expand_as(batch.tensors["old_log_probs"])
    batch.tensors["advantages"] = advantages.contiguous()
    metrics = ppo_update(actor, batch, cfg, mini_batch_size=len(batch), kl_coef=0.05)
    assert "actor/skipped_steps" not in metrics and metrics["actor/grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in weights().items())


@pytest.mark.parametrize("mode", ["token", "seq"])
def test_loss_is_the_global_mean_whatever_the_micro_batch_size(actor_and_batch, mode):
    """pg_loss with 4 micro-batches equals one micro-batch (loss_avg_mode=seq once came out x4)."""
    import copy

    actor, batch, cfg = actor_and_batch
    batch.tensors["old_log_probs"] = actor.model.score(batch, sigma=cfg.monet_rl_sigma, adapter=None) - 0.1
    batch.tensors["advantages"] = torch.tensor([1.0, 0.5, 2.0, 1.5])[:, None].expand_as(
        batch.tensors["old_log_probs"]).contiguous()
    losses = []
    for micro in (len(batch), 1):
        settings = copy.deepcopy(cfg)
        settings.loss_avg_mode, settings.micro_batch_size_per_device_for_update = mode, micro
        for group in actor.optimizer.param_groups:
            group["lr"] = 0.0  # measure the loss twice on the same weights
        losses.append(ppo_update(actor, batch, settings, mini_batch_size=len(batch), kl_coef=0.0)["actor/pg_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-6) and abs(losses[0]) > 1e-4
