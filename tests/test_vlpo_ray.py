"""VLPO end to end on a real local Ray cluster with torch.distributed (gloo) on CPU."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from RL.config import ConfigError, load_config
from RL.train_vlpo import build_trainer
from tests.helpers import read_metrics, run_module, without_timing

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples/config/vlpo_tiny_cpu.yaml"
pytestmark = pytest.mark.slow  # every test here trains on a Ray cluster


@pytest.fixture(scope="module")
def sft_model(vlpo_sft_model):
    return vlpo_sft_model


# Rewards that differ within every group (accuracy minus 0.01 per token), so advantages are never all zero.
VARIED_REWARD = {"worker.reward.reward_type": "sequential", "worker.reward.reward_function_kwargs": "{budget: 0, weight: 0.01}",
                 "worker.reward.reward_function": "examples/reward_function/length_penalty_example.py:compute_score"}


def overrides(root, data_dir, model, name, **extra):
    """A tiny VLPO run's command line (shared with the vLLM and Thyme modules)."""
    values = {
        "worker.actor.model.model_path": model, "data.train_files": f"{data_dir}/train.jsonl",
        "data.val_files": f"{data_dir}/val.jsonl", "trainer.save_dir": str(root / "runs"),
        "trainer.experiment_name": name, "data.rollout_batch_size": 4, "worker.actor.global_batch_size": 4,
        "worker.rollout.n": 2, "worker.rollout.latent_size": 3, "data.max_response_length": 24,
        "trainer.val_before_train": False, "trainer.val_freq": -1, "trainer.logger": "[jsonl]",
    }
    values.update(extra)
    return [f"config={CONFIG}"] + [f"{key}={value}" for key, value in values.items()]


def train(args):
    trainer = build_trainer(load_config(args))
    try:
        trainer.fit()
        return trainer, read_metrics(trainer.run_dir)
    finally:
        trainer.shutdown()


def test_two_rank_step_saves_and_resumes_at_world_size_one(sft_model):
    model, data, root = sft_model
    first, metrics = train(overrides(root, data, model, "ws", **{
        "trainer.n_gpus_per_node": 2, "trainer.max_steps": 2, "trainer.save_freq": 2,
        "trainer.val_freq": 2}))
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["rollout/latent_blocks"] > 0 for m in metrics)
    assert metrics[-1]["rollout/logprob_diff"] < 1e-4  # engine and actor agree on the sampled tokens
    assert "val/accuracy" in metrics[-1]
    assert (Path(first.run_dir) / "step_000002" / "SAVE_OK").exists()
    assert len(list((Path(first.run_dir) / "step_000002/actor/model").glob("*.distcp"))) == 2

    resumed, metrics = train(overrides(root, data, model, "ws", **{
        "trainer.n_gpus_per_node": 1, "trainer.max_steps": 3, "trainer.save_freq": 3}))
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["rollout/logprob_diff"] < 1e-4
    assert (Path(resumed.run_dir) / "step_000003" / "SAVE_OK").exists()


def test_hybrid_sharding_trains_and_its_checkpoint_loads_unsharded(sft_model):
    model, data, root = sft_model
    _, metrics = train(overrides(root, data, model, "hsdp", **{
        "trainer.n_gpus_per_node": 2, "worker.actor.fsdp.fsdp_size": 1, "trainer.max_steps": 1, "trainer.save_freq": 1}))
    assert metrics[-1]["rollout/logprob_diff"] < 1e-4 and metrics[-1]["actor/grad_norm"] > 0
    _, metrics = train(overrides(root, data, model, "hsdp", **{
        "trainer.n_gpus_per_node": 1, "trainer.max_steps": 2, "trainer.save_freq": -1}))
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["rollout/logprob_diff"] < 1e-4


def test_merged_model_logits_equal_the_trained_actor(sft_model):
    from monet_models.transformers import load_latent_model
    from tests.helpers import coloured_image, encode_prompts
    from RL.model_export import merge_checkpoint

    model, data, root = sft_model
    trainer = build_trainer(load_config(overrides(root, data, model, "merge", **{
        "trainer.n_gpus_per_node": 2, "trainer.max_steps": 1, "trainer.save_freq": 1})))
    try:
        trainer.fit()
        trained_state = trainer.policy.call("export_weights")[0]
    finally:
        trainer.shutdown()
    merged_dir = merge_checkpoint(Path(trainer.run_dir) / "step_000001")
    merged, processor = load_latent_model(str(merged_dir))
    actor, _ = load_latent_model(model)
    actor.load_state_dict(trained_state)
    original, _ = load_latent_model(model)
    enc = encode_prompts(processor, ["What colour is the shape?"], [coloured_image()])
    with torch.no_grad():
        merged_logits = merged.eval()(**enc, latent_mode=True).logits
        assert torch.equal(merged_logits, actor.eval()(**enc, latent_mode=True).logits)
        assert not torch.equal(merged_logits, original.eval()(**enc, latent_mode=True).logits)


def test_lora_actor_with_adapter_disabled_reference(sft_model):
    model, data, root = sft_model
    _, metrics = train(overrides(root, data, model, "lora", **{
        "trainer.n_gpus_per_node": 1, "trainer.max_steps": 2, "trainer.save_freq": -1,
        "worker.actor.model.lora.rank": 4, "worker.actor.model.lora.alpha": 8, "worker.actor.optim.lr": 1e-2,
        **VARIED_REWARD}))
    assert metrics[-1]["actor/kl_loss"] > 0  # the reference (adapters off) differs from the trained adapters
    assert metrics[-1]["rollout/logprob_diff"] < 1e-4  # the engine received the merged LoRA weights


def test_separate_rollout_pool_receives_weights_through_ray(sft_model):
    model, data, root = sft_model
    _, metrics = train(overrides(root, data, model, "split", **{
        "trainer.n_gpus_per_node": 1, "trainer.max_steps": 2, "trainer.save_freq": -1,
        "worker.placement.colocate": False}))
    assert metrics[-1]["rollout/logprob_diff"] < 1e-4


def test_online_difficulty_sampling_keeps_mixed_groups_and_fails_clearly(sft_model):
    from RL.trainer.batching import NoQualifyingGroupsError

    model, data, root = sft_model
    common = {"trainer.n_gpus_per_node": 1, "trainer.max_steps": 1, "trainer.save_freq": -1,
              "worker.rollout.online_difficulty_sampling": True, "trainer.max_try_make_batch": 3,
              "data.online_accum_size": 6}
    _, metrics = train(overrides(root, data, model, "ods", **{
        **common, "worker.rollout.monet.select_acc_threshold": 0.5, "trainer.max_try_make_batch": 10}))
    assert 1 <= metrics[0]["rollout/difficulty_tries"] <= 10
    assert metrics[0]["reward/accuracy"] == 0.5  # every kept group of 2 has exactly one correct answer
    with pytest.raises(ConfigError, match="select_acc_threshold"):  # no group accuracy lies in (0, 1e-6]
        load_config(overrides(root, data, model, "ods_never", **common,
                              **{"worker.rollout.monet.select_acc_threshold": 1e-6}))
    every_answer_right = root / "every_answer_right.py"  # every group's accuracy is 1: none lies in (0, 0.5]
    every_answer_right.write_text("def score(sample):\n    return {'overall': 1.0, 'accuracy': 1.0}\n")
    with pytest.raises(NoQualifyingGroupsError, match="trainer.max_try_make_batch"):
        train(overrides(root, data, model, "ods_none", **common, **{
            "worker.rollout.monet.select_acc_threshold": 0.5, "worker.reward.reward_type": "sequential",
            "worker.reward.reward_function": f"{every_answer_right}:score"}))


def run_cli(args, log, crash_at=None):
    return run_module("RL.train_vlpo", args, log, crash_at)


def test_killed_in_every_window_and_restarted_metrics_hold_every_step_once(sft_model, tmp_path):
    """SIGKILL after a step before any save, between a checkpoint's rename and its metrics line, and in the middle
    of pruning; each restart resumes, and metrics.jsonl ends equal to an uninterrupted run's (validation on)."""
    model, data, root = sft_model
    if ray.is_initialized():
        ray.shutdown()
    common = {"trainer.n_gpus_per_node": 1, "trainer.max_steps": 4, "trainer.save_freq": 1, "trainer.save_limit": 1,
              "trainer.val_before_train": True, "trainer.val_freq": 2, "data.val_max_samples": 4}
    with open(tmp_path / "reference.log", "w") as log:
        assert run_cli(overrides(root, data, model, "uninterrupted", **common), log).wait(timeout=600) == 0
    reference = read_metrics(root / "runs/uninterrupted")
    assert [m["step"] for m in reference] == [0, 1, 2, 3, 4]

    args = overrides(root, data, model, "killed", **common)
    windows = ["after_step@1", "after_rename@2", "during_prune@2"]  # saving step 3 prunes step 2 (limit 1)
    for index, window in enumerate(windows):
        with open(tmp_path / f"killed{index}.log", "w") as log:
            assert run_cli(args, log, crash_at=window).wait(timeout=600) == -signal.SIGKILL, window
    with open(tmp_path / "final.log", "w") as log:
        assert run_cli(args, log).wait(timeout=600) == 0
    resumed = read_metrics(root / "runs/killed")
    assert [m["step"] for m in resumed] == [0, 1, 2, 3, 4]
    assert without_timing(resumed) == without_timing(reference)
    assert "resumed" in (tmp_path / "final.log").read_text()

    finished = subprocess.run([sys.executable, "-m", "RL.train_vlpo", *args], cwd=REPO, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert finished.returncode == 0 and "is complete at step 4" in finished.stdout
    assert "raise trainer.max_steps" in finished.stdout
    assert len(read_metrics(root / "runs/killed")) == 5  # nothing ran, nothing was appended


def test_adaptive_kl_moves_by_the_sample_count_and_kl_in_reward_penalises(sft_model):
    model, data, root = sft_model
    horizon, target = 100, 1e-4
    _, metrics = train(overrides(root, data, model, "adaptive", **{
        "trainer.n_gpus_per_node": 1, "trainer.max_steps": 2, "trainer.save_freq": -1,
        "algorithm.kl_type": "adaptive", "algorithm.kl_target": target, "algorithm.kl_horizon": horizon,
        "worker.actor.optim.lr": 1e-2, **VARIED_REWARD}))
    samples = 4 * 2  # rollout_batch_size x n
    error = min(max(metrics[0]["actor/kl_loss"] / target - 1, -0.2), 0.2)
    assert metrics[1]["actor/kl_coef"] == pytest.approx(metrics[0]["actor/kl_coef"] * (1 + error * samples / horizon))
    assert metrics[1]["actor/kl_coef"] != metrics[0]["actor/kl_coef"]

    _, metrics = train(overrides(root, data, model, "kl_in_reward", **{
        "trainer.n_gpus_per_node": 1, "trainer.max_steps": 2, "trainer.save_freq": -1,
        "algorithm.use_kl_loss": False, "algorithm.kl_coef": 0.5, "worker.actor.optim.lr": 1e-2, **VARIED_REWARD}))
    assert "actor/kl_loss" not in metrics[-1]  # no KL term in the loss ...
    assert metrics[-1]["reward/kl"] > 0  # ... but a measured KL that the advantages were penalised with
