"""Run-folder checkpoints: atomic saves, crash leftovers, pruning, trainer state and RNG streams."""
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from RL.checkpoint import CheckpointManager, rng_state, set_rng_state

ROOT = Path(__file__).resolve().parents[1]


def save(manager, step, **extra):
    folder = manager.begin(step)
    (folder / "actor" / "model").mkdir(parents=True)
    (folder / "actor" / "model" / "__0_0.distcp").write_bytes(b"weights %d" % step)
    return manager.finish(step, {"step": step, **extra})


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_names_and_latest(tmp_path):
    manager = CheckpointManager(tmp_path / "run", save_limit=0)
    assert manager.latest() is None
    assert manager.step_dir(50).name == "step_000050"
    assert manager.begin(50).name == "step_000050.tmp"
    final = manager.finish(50, {"step": 50})
    assert final == manager.step_dir(50) and (final / "SAVE_OK").is_file()
    assert not (tmp_path / "run" / "step_000050.tmp").exists()
    assert manager.latest() == (50, final)
    assert manager.load_trainer_state(final)["step"] == 50


def test_tmp_without_save_ok_is_ignored_and_cleaned(tmp_path):
    manager = CheckpointManager(tmp_path, save_limit=3)
    first = save(manager, 10)
    tmp = manager.begin(20)
    (tmp / "actor").mkdir()
    (tmp / "actor" / "half_written.distcp").write_bytes(b"\0" * 100)
    (tmp_path / "step_000030").mkdir()  # a folder without SAVE_OK is never "latest"
    assert manager.latest() == (10, first)
    CheckpointManager(tmp_path, save_limit=3)  # the next run's manager
    assert not tmp.exists()
    assert manager.latest() == (10, first)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    """A process that dies between begin() and finish() (partial shard files) leaves step 1 as the latest."""
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os
        from RL.checkpoint import CheckpointManager
        manager = CheckpointManager({str(run)!r}, save_limit=2)
        manager.begin(1)
        manager.finish(1, {{"step": 1}})
        folder = manager.begin(2)
        (folder / "actor" / "model").mkdir(parents=True)
        with open(folder / "actor" / "model" / "__0_0.distcp", "wb") as handle:
            handle.write(b"partial")
            handle.flush()
            os._exit(9)  # killed mid-write: no finish(), no SAVE_OK
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    assert (run / "step_000002.tmp" / "actor" / "model" / "__0_0.distcp").is_file()
    manager = CheckpointManager(run, save_limit=2)
    assert not (run / "step_000002.tmp").exists()
    step, folder = manager.latest()
    assert step == 1 and manager.load_trainer_state(folder) == {"step": 1}
    save(manager, 2)  # the resumed run saves step 2 again
    assert manager.latest()[0] == 2


def test_crash_before_rename_is_not_latest(tmp_path):
    """SAVE_OK inside a .tmp folder (crash before the rename) does not make it a checkpoint."""
    manager = CheckpointManager(tmp_path, save_limit=0)
    save(manager, 1)
    tmp = manager.begin(2)
    (tmp / "SAVE_OK").write_text("step 2\n")
    assert manager.latest()[0] == 1


def test_pruning_keeps_newest(tmp_path):
    manager = CheckpointManager(tmp_path, save_limit=2)
    for step in (5, 10, 15, 20):
        save(manager, step)
    assert [step for step, _ in manager.complete_steps()] == [15, 20]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_000015", "step_000020"]
    keep_all = CheckpointManager(tmp_path / "all", save_limit=-1)
    for step in range(1, 5):
        save(keep_all, step)
    assert len(keep_all.complete_steps()) == 4


def test_pruning_ignores_incomplete_and_keeps_newest_complete(tmp_path):
    manager = CheckpointManager(tmp_path, save_limit=1)
    save(manager, 1)
    manager.begin(2)  # in progress, not complete
    assert manager.latest()[0] == 1 and manager.step_dir(1).is_dir()
    save(manager, 3)
    assert [step for step, _ in manager.complete_steps()] == [3]


def test_resave_same_step_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path, save_limit=0)
    save(manager, 7, tag="old")
    save(manager, 7, tag="new")
    assert manager.load_trainer_state(manager.latest()[1])["tag"] == "new"
    assert [path.name for path in tmp_path.iterdir()] == ["step_000007"]


def test_finish_without_begin_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="begin"):
        CheckpointManager(tmp_path).finish(3, {})


def test_trainer_state_round_trip_reproduces_random_numbers(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws()  # advance the streams a little
    manager = CheckpointManager(tmp_path, save_limit=1)
    state = {"step": 12, "loader": {"epoch": 1, "index": 40}, "rng": rng_state(),
             "kl_controller": {"value": 0.05}, "baselines": {"uid": torch.tensor([0.5, 0.25])}}
    manager.begin(12)
    manager.finish(12, state)
    expected = draws()
    draws()  # the run goes on (or a new process starts with other seeds)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)

    loaded = manager.load_trainer_state(manager.latest()[1])
    set_rng_state(loaded["rng"])
    assert draws() == expected
    assert loaded["loader"] == {"epoch": 1, "index": 40} and loaded["kl_controller"] == {"value": 0.05}
    assert torch.equal(loaded["baselines"]["uid"], torch.tensor([0.5, 0.25]))


def test_rng_state_survives_list_conversion():
    """A state that went through a serializer turning tuples into lists still restores Python's stream."""
    state = rng_state()
    expected = draws()
    state["python"] = [state["python"][0], list(state["python"][1]), state["python"][2]]
    set_rng_state(state)
    assert draws() == expected


def test_a_finished_run_started_again_names_the_data_and_model_keys_that_changed(tmp_path):
    """A finished run says "complete" for the same command, and for one with other data or another model names the
    keys that differ (VLPO / self-evolution, then SFT, whose stage and K define its run too)."""
    from common.checkpoint_layout import SAVE_OK
    from RL.config import ConfigError, load_config
    from RL.run_config import write_run_config
    from RL.train_sft import run_sft, sft_run_config
    from RL.train_vlpo import finished_message

    def finish(config):
        write_run_config(config)
        step = Path(config.trainer.run_dir) / "step_000002"
        step.mkdir()
        (step / SAVE_OK).write_text('{"step": 2, "total_steps": 2}\n')

    base = [f"trainer.save_dir={tmp_path}", "trainer.experiment_name=done", f"data.train_files={tmp_path}/a.jsonl",
            f"worker.actor.model.model_path={tmp_path}/model", "worker.rule_based_judge.api_name="]
    finish(load_config(base))
    assert "is complete at step 2" in finished_message(load_config(base))
    assert "is complete" in finished_message(load_config(base + ["trainer.logger=[jsonl]"]))  # not an input
    with pytest.raises(ConfigError) as refused:
        finished_message(load_config(base + [f"data.train_files={tmp_path}/b.jsonl", "data.max_pixels=4000000"]))
    message = str(refused.value)
    assert f"data.train_files: '{tmp_path}/a.jsonl' -> '{tmp_path}/b.jsonl'" in message
    assert "data.max_pixels: " in message and "-> 4000000" in message and "model_path" not in message
    assert "trainer.experiment_name" in message and "trainer.resume=false" in message

    sft = base + ["sft.stage=mirage2", "sft.latent_size=4"]
    finish(sft_run_config(load_config(sft, require_inputs=False)))
    with pytest.raises(ConfigError, match=r"sft\.latent_size: 4 -> 6") as refused:
        run_sft(load_config(sft + ["sft.latent_size=6"], require_inputs=False))
    assert "data." not in str(refused.value) and "raise sft.steps" in str(refused.value)
