"""GAE with a critic end to end: a VLPO run on a real local Ray cluster (gloo, CPU) that is SIGKILLed at a checkpoint
boundary and resumes with the critic's weights and optimizer restored (the held-out formula checks of GAE, the value
loss and ReMax are in test_algorithms.py)."""
import signal

import pytest
import ray

from tests.helpers import read_metrics
from tests.test_vlpo_ray import VARIED_REWARD, overrides, run_cli

pytestmark = pytest.mark.slow


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
