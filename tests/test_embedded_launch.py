"""The launch scripts as a user runs them (bash, subprocesses): `--help`, and the embedded default's sealed warm start.

The user's key=value overrides must reach only the VLPO / self-evolution run: a warm start trained with them (an
`lr`, someone's RL rows) would be sealed and reused by every later run. Every run here points EMBEDDED_DIR, TOY_DIR
and trainer.save_dir at tmp_path, so the user's runs/ and toy data are never touched.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, read_metrics
from RL.toy_task import make_toy_dataset

SCRIPTS = ["vlpo_train.sh", "ireasoner_train.sh", "sft_train.sh", "eval.sh", "merge_model.sh", "lmms_eval_endpoint.sh"]


def launch(script: str, *args: str, folder: Path, **env: str) -> subprocess.CompletedProcess:
    """`bash examples/<script> args` from another directory, its embedded folders under `folder`."""
    full_env = dict(os.environ, EMBEDDED_DIR=str(folder / "embedded"), TOY_DIR=str(folder / "toy"), **env)
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run(["bash", str(REPO / "examples" / script), *args], cwd=folder, env=full_env,
                          capture_output=True, text=True)


def commands(stdout: str) -> list[list[str]]:
    """The commands a DRY_RUN=1 launch printed (`+ command`), as argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def module_runs(stdout: str, module: str) -> list[list[str]]:
    return [command for command in commands(stdout) if command[1:3] == ["-m", module]]


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_usage_and_does_nothing_else(script, flag, tmp_path):
    result = launch(script, flag, folder=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"bash examples/{script}" in result.stdout
    assert result.stderr == ""
    assert list(tmp_path.iterdir()) == []  # no model, no toy data


USER_ARGS = ["data.train_files=/data/my.jsonl", "worker.actor.optim.lr=1e-6"]


def test_embedded_vlpo_gives_user_overrides_to_vlpo_only(tmp_path):
    result = launch("vlpo_train.sh", *USER_ARGS, folder=tmp_path, DRY_RUN="1", SFT_STEPS_3="7")
    assert result.returncode == 0, result.stderr
    warm_start = module_runs(result.stdout, "RL.train_sft")
    assert [arg for command in warm_start for arg in command if arg.startswith("sft.stage=")] == [
        "sft.stage=monet1", "sft.stage=monet2", "sft.stage=monet3"]
    toy_rows = f"data.train_files={tmp_path / 'toy' / 'sft_monet.json'}"
    for command in warm_start:
        assert toy_rows in command and not set(USER_ARGS) & set(command)
    assert "sft.steps=7" in warm_start[-1]
    (vlpo,) = module_runs(result.stdout, "RL.train_vlpo")
    assert vlpo[-2:] == USER_ARGS  # last, so they win over the embedded defaults
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_embedded_self_evolution_gives_user_overrides_to_self_evolution_only(tmp_path):
    result = launch("ireasoner_train.sh", *USER_ARGS, folder=tmp_path, DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    (warm_start,) = module_runs(result.stdout, "RL.train_sft")
    assert not set(USER_ARGS) & set(warm_start)
    (run,) = module_runs(result.stdout, "RL.train_self_evolution")
    assert run[-2:] == USER_ARGS


@pytest.mark.parametrize("args, message", [
    (["stage=monet4"], "error: stage=monet4: unknown stage; give one of monet1, monet2, monet3, mirage1, mirage2"),
    (["stage=monet3"], "run first: bash examples/sft_train.sh stage=monet1"),
    (["stage=mirage2"], "run first: bash examples/sft_train.sh stage=mirage1"),
    (["worker.actor.optim.lr=1e-6"], "error: the embedded warm start takes no key=value overrides"),
])
def test_embedded_sft_refusals(args, message, tmp_path):
    result = launch("sft_train.sh", *args, folder=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage, rows, model", [("monet1", "sft_monet.json", "tiny_model"),
                                                ("mirage1", "sft_mirage.jsonl", "tiny_model"),
                                                ("mirage2", "sft_mirage.jsonl", "stages/sft_mirage1")])
def test_embedded_sft_stage_runs_that_stage_on_the_toy_rows(stage, rows, model, tmp_path):
    result = launch("sft_train.sh", f"stage={stage}", "sft.steps=3", folder=tmp_path, DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    (command,) = module_runs(result.stdout, "RL.train_sft")
    embedded = tmp_path / "embedded"
    for expected in (f"sft.stage={stage}", f"data.train_files={tmp_path / 'toy' / rows}",
                     f"worker.actor.model.model_path={embedded / model}",
                     f"sft.output_dir={embedded / 'stages' / ('sft_' + stage)}"):
        assert expected in command
    assert command[-1] == "sft.steps=3"


@pytest.fixture
def ray_tmp():
    """The runs' own Ray temp folder, short (Ray's socket paths have a length limit), removed afterwards."""
    folder = tempfile.mkdtemp(prefix="ray_embedded_", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def file_digests(folder: Path) -> dict[str, tuple[str, int]]:
    """Each file's content hash and modification time: a sealed warm start must keep both."""
    return {str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_embedded_vlpo_trains_user_rows_on_a_sealed_warm_start(tmp_path, ray_tmp):
    """The README's `vlpo_train.sh data.train_files=X data.val_files=Y`: the warm start on the toy data, VLPO on X; a
    later run with another lr keeps the sealed warm start and gives the lr to VLPO; a changed SFT_STEPS_3 rebuilds it."""
    mine = make_toy_dataset(tmp_path / "mine", n_train=16, n_val=4, seed=1)
    env = {"SFT_STEPS_1": "2", "SFT_STEPS_2": "2", "SFT_STEPS_3": "2", "RAY_TMPDIR": ray_tmp}
    embedded, runs = tmp_path / "embedded", tmp_path / "runs"
    vlpo_args = [f"data.train_files={mine}/train.jsonl", f"data.val_files={mine}/val.jsonl", "trainer.max_steps=1",
                 "trainer.val_before_train=false", f"trainer.save_dir={runs}"]

    first = launch("vlpo_train.sh", *vlpo_args, "trainer.experiment_name=mine", folder=tmp_path, **env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    vlpo_config = yaml.safe_load((runs / "mine" / "config.yaml").read_text())
    assert vlpo_config["data"]["train_files"] == f"{mine}/train.jsonl"
    assert [row["step"] for row in read_metrics(runs / "mine")] == [1]
    for run in ("sft_monet1-run", "sft_monet2-run", "tiny_sft_model-run"):
        sft_config = yaml.safe_load((embedded / run / "config.yaml").read_text())
        assert sft_config["data"]["train_files"] == str(tmp_path / "toy" / "sft_monet.json")
    model = embedded / "tiny_sft_model"
    assert "SFT_STEPS_3=2" in (model / "SFT_OK").read_text().splitlines()
    sealed = file_digests(model)

    # A later run with another lr: the seal is checked and kept, the lr reaches VLPO only (a dry run: the VLPO run
    # itself is the one above, and training it again would only repeat it).
    second = launch("vlpo_train.sh", *vlpo_args, "trainer.experiment_name=mine_lr", "worker.actor.optim.lr=1e-5",
                    folder=tmp_path, **{**env, "DRY_RUN": "1"})
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "is sealed with these settings" in second.stdout
    assert not module_runs(second.stdout, "RL.train_sft")
    [vlpo] = module_runs(second.stdout, "RL.train_vlpo")
    assert "worker.actor.optim.lr=1e-5" in vlpo and f"worker.actor.model.model_path={model}" in vlpo
    assert file_digests(model) == sealed

    # A changed setting rebuilds: shown with DRY_RUN (the rebuild itself is the chain the first run already ran).
    rebuilt = launch("sft_train.sh", folder=tmp_path, **{**env, "SFT_STEPS_3": "3", "DRY_RUN": "1"})
    assert rebuilt.returncode == 0, rebuilt.stdout[-3000:] + rebuilt.stderr[-3000:]
    assert "warm start settings changed (SFT_STEPS_3 2 -> 3): rebuilding" in rebuilt.stdout
    assert any(line.startswith("+ rm -rf") and "tiny_sft_model" in line for line in rebuilt.stdout.splitlines())
    assert "sft.steps=3" in rebuilt.stdout
    assert file_digests(model) == sealed  # a dry run changes nothing


@pytest.mark.slow
def test_embedded_mirage_stages_run_in_order_on_the_toy_rows(tmp_path, ray_tmp):
    """Mirage's stages have toy defaults too: stage 1 on the helper-image rows from the tiny model, stage 2 from it."""
    env = {"RAY_TMPDIR": ray_tmp}
    stages = tmp_path / "embedded" / "stages"
    for stage in ("mirage1", "mirage2"):
        result = launch("sft_train.sh", f"stage={stage}", "sft.steps=2", folder=tmp_path, **env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert (stages / f"sft_{stage}" / "config.json").is_file()
        run = stages / f"sft_{stage}-run"
        assert yaml.safe_load((run / "config.yaml").read_text())["sft"]["stage"] == stage
        assert [row["step"] for row in read_metrics(run)] == [1, 2]


def test_relative_paths_are_the_folder_the_script_was_run_from(tmp_path):
    """A launch script stays in the caller's folder: a relative model folder is looked for there, not in the
    repository (before, `main/examples/...` given from the repository's parent became `.../main/main/examples/...`)."""
    result = launch("vlpo_train.sh", "worker.actor.model.model_path=no_model", "data.train_files=rows.jsonl",
                    folder=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"no such folder {tmp_path / 'no_model'}" in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []
