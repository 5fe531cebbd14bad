"""GAE with a critic end to end: a VLPO run on a real local Ray cluster (gloo, CPU) that is SIGKILLed at a checkpoint
boundary and resumes with the critic's weights and optimizer restored (the held-out formula checks of GAE, the value
loss and ReMax are in test_algorithms.py); and, in one process (FSDP2 over a gloo world of one), the critic's
token-budget micro-batches giving the values, value loss and gradients of fixed ones."""
import copy
import signal

import pytest
import ray
import torch

from RL.config import ConfigError, load_config
from tests.helpers import gradients_of_one_step, read_metrics
from tests.test_vlpo_ray import VARIED_REWARD, overrides, run_cli
from workers.actor.model_inputs import micro_batches, sample_tokens


@pytest.fixture(scope="module")
def critic_and_batch(process_group, tiny_model_dir):
    """The tiny critic with its value head moved off zero (so the loss reaches the backbone) and four rollouts of
    different lengths with latent blocks, their old values and returns set apart so that some values are clipped."""
    from monet_models.transformers import load_latent_model
    from tests.helpers import latent_rollout_batch
    from workers.critic import build_critic

    config = load_config(["config=examples/config/vlpo_tiny_cpu.yaml",
                          f"worker.actor.model.model_path={tiny_model_dir}", "algorithm.adv_estimator=gae",
                          "worker.critic.global_batch_size=4", "worker.critic.fsdp.torch_dtype=fp32",
                          "worker.critic.model.enable_gradient_checkpointing=false",
                          "worker.critic.max_grad_norm=1e9", "worker.critic.cliprange_value=0.05"],
                         require_inputs=False)
    critic = build_critic(config, total_steps=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in critic.model.module.named_parameters():
            if name.startswith("value_head"):
                param.to_local().copy_(0.05 * torch.randn(param.to_local().shape, generator=generator))
    base, processor = load_latent_model(tiny_model_dir)
    batch = latent_rollout_batch(base, processor, "Which shape is it, and where?", n=2, max_new_tokens=12,
                                 latent_size=3)
    values = critic.model.compute_values(batch)
    batch.tensors["values"] = values + 0.1 * torch.randn(values.shape, generator=generator)
    batch.tensors["returns"] = values + torch.randn(values.shape, generator=generator)
    return critic, batch, config.worker.critic


def value_update(critic, batch, cfg):
    """vf_loss, grad_norm and the full gradients of one critic step at learning rate 0 (the weights stay)."""
    from workers.critic import update_critic

    return gradients_of_one_step(critic.model.module, critic.optimizer,
                                 lambda: update_critic(critic, batch, cfg, mini_batch_size=len(batch)))


@pytest.mark.parametrize("mode", ["token", "seq"])
def test_critic_dynamic_batching_gives_the_values_and_update_of_fixed_micro_batches(critic_and_batch, mode):
    critic, batch, cfg = critic_and_batch
    lengths = sample_tokens(batch, padding_free=True)
    fixed, dynamic = copy.deepcopy(cfg), copy.deepcopy(cfg)
    fixed.loss_avg_mode = dynamic.loss_avg_mode = mode
    fixed.micro_batch_size_per_device_for_update = fixed.micro_batch_size_per_device_for_experience = len(batch)
    dynamic.dynamic_batching = True
    dynamic.ppo_max_token_len_per_gpu = int(lengths.max() + lengths.min())
    dynamic.forward_max_token_len_per_gpu = int(lengths.max())
    assert len(micro_batches(batch, 1, dynamic.ppo_max_token_len_per_gpu)) in (2, 3)
    assert len(micro_batches(batch, 1, dynamic.forward_max_token_len_per_gpu)) > 1
    outcomes = []
    for settings in (fixed, dynamic):
        critic.model.config = settings  # what the value pass reads
        outcomes.append((critic.model.compute_values(batch), *value_update(critic, batch, settings)))
    critic.model.config = cfg
    (values_a, metrics_a, grads_a), (values_b, metrics_b, grads_b) = outcomes
    assert values_a.abs().sum() > 0 and (values_b - values_a).abs().max() <= 1e-5
    assert metrics_a["critic/vf_clipfrac"] > 0 and metrics_a["critic/grad_norm"] > 0
    for key in ("critic/vf_loss", "critic/grad_norm"):  # vf_clipfrac: a mean over micro-batches
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-5, abs=1e-7), key
    assert grads_a.keys() == grads_b.keys() and any(name.startswith("backbone.") for name in grads_a)
    for name, grad in grads_a.items():
        assert torch.allclose(grads_b[name], grad, rtol=1e-4, atol=1e-6), name


def test_config_refuses_a_critic_budget_below_the_longest_sequence():
    base = ["data.train_files=train.jsonl", "worker.actor.model.model_path=/models/tiny", "algorithm.adv_estimator=gae",
            "data.max_prompt_length=100", "data.max_response_length=50", "worker.critic.dynamic_batching=true"]
    with pytest.raises(ConfigError, match="worker.critic.forward_max_token_len_per_gpu.*150"):
        load_config(base + ["worker.critic.forward_max_token_len_per_gpu=149"])
    assert load_config(base + ["worker.critic.ppo_max_token_len_per_gpu=150"]).worker.critic.dynamic_batching


@pytest.mark.slow
def test_gae_run_with_critic_warmup_resumes_after_sigkill_with_the_critic_restored(vlpo_sft_model, tmp_path):
    model, data, root = vlpo_sft_model
    if ray.is_initialized():  # the runs below start their own clusters
        ray.shutdown()
    args = overrides(root, data, model, "gae", **{
        "trainer.n_gpus_per_node": 1, "trainer.max_steps": 2, "trainer.save_freq": 1,
        "algorithm.adv_estimator": "gae", "algorithm.lam": 0.95, "trainer.critic_warmup": 1,
        "worker.critic.global_batch_size": 4, "worker.critic.optim.lr": 1e-3, "worker.actor.entropy_coeff": 0.01,
        **VARIED_REWARD})
    with open(tmp_path / "killed.log", "w") as log:  # step 1's checkpoint is complete, its metrics line is not
        assert run_cli(args, log, crash_at="after_rename@1").wait(timeout=600) == -signal.SIGKILL
    run = root / "runs/gae"
    assert (run / "step_000001/critic/model").is_dir() and (run / "step_000001/critic/optim").is_dir()
    with open(tmp_path / "resumed.log", "w") as log:
        assert run_cli(args, log).wait(timeout=600) == 0
    assert "resumed" in (tmp_path / "resumed.log").read_text()
    warmup, trained = read_metrics(run)
    assert (warmup["step"], trained["step"]) == (1, 2)
    # step 1 (re-emitted from the checkpoint): the critic alone trained; its zero-initialised head gave values 0
    assert "actor/pg_loss" not in warmup and warmup["critic/vf_loss"] > 0 and warmup["critic/values_mean"] == 0
    assert warmup["critic/grad_norm"] > 0 and warmup["actor/entropy"] > 0
    # step 2 (after the kill): a fresh critic would give exactly 0 again; the restored one gives its trained values
    assert trained["critic/values_mean"] != 0 and "critic/vf_explained_var" in trained
    assert trained["actor/grad_norm"] > 0 and trained["actor/entropy_bonus"] > 0
    assert (run / "step_000002/critic/model").is_dir()
