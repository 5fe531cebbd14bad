"""Latent SFT end to end on a real local Ray cluster with FSDP (gloo): global means across world sizes, checkpoints
saved by two ranks and resumed by one, and resumes after SIGKILL (while writing monet3's targets, and between a
checkpoint and its metrics line) that give exactly the losses of an uninterrupted run."""
import signal
from pathlib import Path

import pytest
import ray

from RL.config import load_config
from RL.train_sft import run_sft
from tests.helpers import read_metrics, run_module, without_timing

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples/config/sft_tiny_cpu.yaml"
pytestmark = pytest.mark.slow  # every test here trains on a Ray cluster


def args(model, data, root, name, stage, **extra) -> list[str]:
    values = {"worker.actor.model.model_path": model, "data.train_files": f"{data}/sft_monet.json",
              "sft.stage": stage, "sft.latent_size": 3, "sft.batch_size": 4, "sft.micro_batch_size": 2,
              "sft.steps": 3, "trainer.save_freq": 2, "trainer.save_dir": str(root), "trainer.experiment_name": name,
              "trainer.logger": "[jsonl]", "sft.observation_weight": 4.0, **extra}
    return [f"config={CONFIG}"] + [f"{key}={value}" for key, value in values.items()]


def test_monet2_saved_by_two_ranks_resumes_on_one_with_the_losses_of_two(tiny_model_dir, sft_data_dir, tmp_path):
    """With gradient checkpointing: the recurrence's rounds are recomputed in backward on every rank alike."""
    checkpointing = {"worker.actor.model.enable_gradient_checkpointing": True}
    whole = read_metrics(run_sft(load_config(args(tiny_model_dir, sft_data_dir, tmp_path, "whole", "monet2",
                                             **{"trainer.n_gpus_per_node": 2}, **checkpointing))).parent)
    assert [m["step"] for m in whole] == [1, 2, 3] and all(m["sft/align"] > 0 for m in whole)
    run_sft(load_config(args(tiny_model_dir, sft_data_dir, tmp_path, "split", "monet2",
                             **{"trainer.n_gpus_per_node": 2, "sft.steps": 2}, **checkpointing)))
    assert len(list((tmp_path / "split-sft-monet2/step_000002/actor/model").glob("*.distcp"))) == 2
    model = run_sft(load_config(args(tiny_model_dir, sft_data_dir, tmp_path, "split", "monet2",
                                     **{"trainer.n_gpus_per_node": 1}, **checkpointing)))
    split = read_metrics(tmp_path / "split-sft-monet2")
    assert [m["step"] for m in split] == [1, 2, 3]
    for key in ("sft/ce", "sft/align", "sft/loss"):  # step 3 ran on one rank, steps 1 and 2 on two
        assert split[-1][key] == pytest.approx(whole[-1][key], rel=1e-5, abs=1e-6), key
    assert split[-1]["actor/grad_norm"] == pytest.approx(whole[-1]["actor/grad_norm"], rel=1e-4)  # summed in another order
    assert (model / "model.safetensors").is_file() and (model / "SFT_EXPORT.json").is_file()


def run_cli(args, log, crash_at=None):
    return run_module("RL.train_sft", args, log, crash_at)


def test_monet3_killed_while_writing_targets_and_after_a_save_resumes_to_the_same_losses(tiny_model_dir,
                                                                                          sft_data_dir, tmp_path):
    if ray.is_initialized():
        ray.shutdown()  # the subprocesses start their own clusters
    common = {"sft.teacher_path": tiny_model_dir, "trainer.save_freq": 1, "trainer.save_limit": 1,
              "trainer.n_gpus_per_node": 2}
    with open(tmp_path / "reference.log", "w") as log:
        reference_args = args(tiny_model_dir, sft_data_dir, tmp_path, "reference", "monet3", **common)
        assert run_cli(reference_args, log).wait(600) == 0
    reference = read_metrics(tmp_path / "reference-sft-monet3")
    killed = args(tiny_model_dir, sft_data_dir, tmp_path, "killed", "monet3", **common)
    with open(tmp_path / "killed0.log", "w") as log:  # 16 rows in parts of 4: parts 0 and 1 written
        assert run_cli(killed, log, crash_at="latent_targets@1").wait(600) == -signal.SIGKILL
    targets = tmp_path / "killed-sft-monet3/latent_targets"
    assert (targets / "part_00001.done").is_file() and not (targets / "MANIFEST.json").exists()
    with open(tmp_path / "killed1.log", "w") as log:
        assert run_cli(killed, log, crash_at="after_rename@2").wait(600) == -signal.SIGKILL
    with open(tmp_path / "final.log", "w") as log:
        assert run_cli(killed, log).wait(600) == 0
    resumed = read_metrics(tmp_path / "killed-sft-monet3")
    assert [m["step"] for m in resumed] == [1, 2, 3] and "resumed" in (tmp_path / "final.log").read_text()
    assert without_timing(resumed) == without_timing(reference)
    assert (targets / "MANIFEST.json").is_file() and all(m["sft/align"] > 0 for m in resumed)
