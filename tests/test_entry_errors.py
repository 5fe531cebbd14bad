"""Entry points fail with one `error:` line (exit 2: bad input, 1: a failed run) and the traceback in a log file.

Each case runs the real entry point in a subprocess and checks the status, the last stderr line, that no traceback
reaches the console (unless --debug), the log file holding it, and that nothing was written or damaged. The model
folder, checkpoint and run-folder checks run before Ray starts, so those cases take seconds.
"""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import assert_one_line, read_metrics

REPO = Path(__file__).resolve().parent.parent
TINY_CPU = REPO / "examples" / "config" / "vlpo_tiny_cpu.yaml"
ENTRY_POINTS = ["RL.main", "RL.train_vlpo", "RL.train_sft", "RL.train_self_evolution", "RL.evaluate", "tools.generate", "tools.judge",
                "tools.merge_model"]


def run(module: str, args: list[str], tmp: Path, code: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """`python -m module args` (or a script holding `code`) with its own temp dir, where the fallback log goes."""
    (tmp / "temp").mkdir(exist_ok=True)
    if code:
        (tmp / "entry.py").write_text(code)
    command = [str(tmp / "entry.py")] if code else ["-m", module]
    inherited = {key: value for key, value in os.environ.items() if key != "LATENT_RL_DEBUG"}
    environ = {**inherited, "TMPDIR": str(tmp / "temp"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, *command, *args], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=600)


def temp_logs(tmp: Path) -> list[Path]:
    return sorted((tmp / "temp" / "latent-rl-errors").glob("*.log"))


def assert_logged(log: Path, *fragments: str) -> None:
    text = log.read_text()
    assert "Traceback (most recent call last)" in text
    for fragment in fragments:
        assert fragment in text


def vlpo_args(tmp: Path, model, data, **extra) -> list[str]:
    values = {"worker.actor.model.model_path": model, "data.train_files": f"{data}/train.jsonl",
              "data.val_files": f"{data}/val.jsonl", "trainer.save_dir": str(tmp / "runs"),
              "trainer.experiment_name": "run", "worker.rule_based_judge.api_name": "",
              "trainer.val_before_train": False, "trainer.val_freq": -1, "trainer.logger": "[jsonl]", **extra}
    return [f"config={TINY_CPU}"] + [f"{key}={value}" for key, value in values.items()]


# ---- --help, --debug, and the run_cli contract ------------------------------------------------------------------
@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_prints_the_usage_and_does_nothing_else(module, tmp_path):
    result = run(module, ["--help", f"trainer.save_dir={tmp_path / 'runs'}"] if module.startswith("RL") else ["-h"],
                 tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = {"RL.main": "RL.train_vlpo"}.get(module, module)  # Monet's command runs the VLPO entry
    assert result.stdout.startswith("usage:") and runs in result.stdout.splitlines()[0]
    assert result.stderr == "" and not (tmp_path / "runs").exists()


BUG = "from common.cli import run_cli\ndef main(argv):\n    print(argv)\n    return 1 / 0\nrun_cli(main)\n"


def test_a_failure_is_one_line_naming_the_log_and_debug_prints_the_traceback(tmp_path):
    result = run("", ["a=1"], tmp_path, code=BUG)
    last = assert_one_line(result, 1, "ZeroDivisionError: division by zero", "full traceback in")
    [log] = temp_logs(tmp_path)
    assert str(log) in last
    assert_logged(log, "return 1 / 0")
    for args, env in ((["a=1", "--debug"], {}), (["a=1"], {"LATENT_RL_DEBUG": "1"})):
        debug = run("", args, tmp_path, code=BUG, **env)
        assert debug.returncode == 1 and "Traceback" in debug.stderr and "return 1 / 0" in debug.stderr
        assert debug.stdout.strip() == "['a=1']"  # --debug never reaches the entry point's own parser


@pytest.fixture
def ray_dir():
    """Ray's own temp folder: short, because its socket paths must stay under 108 bytes."""
    folder = tempfile.mkdtemp(prefix="ray_errors_", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow  # starts a Ray cluster
def test_a_ray_task_error_caused_by_bad_input_is_reported_as_that_input_error(ray_dir, tmp_path):
    code = ("import ray\nfrom common.cli import InputError, run_cli\n"
            "def fails():\n    raise InputError('data.train_files: rows.jsonl:3: no question')\n"
            "def main(argv):\n"
            f"    ray.init(num_cpus=1, include_dashboard=False, _temp_dir={ray_dir!r})\n"
            "    ray.get(ray.remote(fails).remote())\n"
            "run_cli(main)\n")
    result = run("", [], tmp_path, code=code, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    last = assert_one_line(result, 2)
    assert last == "error: data.train_files: rows.jsonl:3: no question"
    assert_logged(temp_logs(tmp_path)[-1], "RayTaskError")


# ---- model folders, before Ray starts ---------------------------------------------------------------------------
def damaged_model(tiny_model_dir: str, folder: Path, damage: str) -> Path:
    """A copy of the tiny model with one defect."""
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    if damage == "empty":
        shutil.rmtree(folder)
        folder.mkdir()
    elif damage == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "sharded, one shard truncated":
        header_size = int.from_bytes(weights.read_bytes()[:8], "little")
        names = json.loads(weights.read_bytes()[8:8 + header_size])
        index = {"weight_map": {name: "model-00002-of-00002.safetensors" for name in names if name != "__metadata__"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        shard = weights.rename(folder / "model-00002-of-00002.safetensors")
        os.truncate(shard, shard.stat().st_size - 1000)
    return folder


@pytest.mark.parametrize("damage, fragments", [
    ("empty", ["worker.actor.model.model_path", "config.json", "processor files", "model.safetensors"]),
    ("truncated", ["worker.actor.model.model_path", "model.safetensors is truncated"]),
    ("sharded, one shard truncated", ["model-00002-of-00002.safetensors is truncated ("]),
])
def test_a_damaged_model_folder_is_refused_before_ray_naming_the_file(damage, fragments, tiny_model_dir,
                                                                      toy_data_dir, tmp_path):
    model = damaged_model(tiny_model_dir, tmp_path / "model", damage)
    result = run("RL.train_vlpo", vlpo_args(tmp_path, model, toy_data_dir), tmp_path)
    assert_one_line(result, 2, str(model), *fragments)
    assert_logged(temp_logs(tmp_path)[-1], "ModelFolderError")
    assert not (tmp_path / "runs").exists()  # nothing written
    generate = run("tools.generate", ["--model", str(model), "--prompt", "hi"], tmp_path)
    assert_one_line(generate, 2, "--model", str(model))


# ---- the run folder: read-only before Ray, a checkpoint that cannot be resumed ----------------------------------
@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted on `folder` for the test (we run as root); the test is skipped where mounting is refused."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    with tmpfs(tmp_path / "read_only", "ro,size=1m") as folder:
        yield folder


def test_a_read_only_save_dir_is_refused_before_ray(read_only_dir, tiny_model_dir, toy_data_dir, tmp_path):
    args = vlpo_args(tmp_path, tiny_model_dir, toy_data_dir) + [f"trainer.save_dir={read_only_dir}"]
    result = run("RL.train_vlpo", args, tmp_path)
    assert_one_line(result, 2, "trainer.save_dir", str(read_only_dir / "run"), "Read-only file system")
    assert_logged(temp_logs(tmp_path)[-1], "SaveDirError")


def write_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint written by the real writers: DCP shards for the model and optimizer, then the manager's
    trainer_state.pt, SAVE_OK and rename."""
    import torch
    import torch.distributed.checkpoint as dcp

    from RL.checkpoint import CheckpointManager, rng_state

    manager = CheckpointManager(run_dir)
    folder = manager.begin(step)
    dcp.save({"weight": torch.arange(50000, dtype=torch.float32)}, checkpoint_id=str(folder / "actor" / "model"))
    dcp.save({"optimizer": {"exp_avg": torch.ones(50000)}}, checkpoint_id=str(folder / "actor" / "optim"))
    return manager.finish(step, {"step": step, "total_steps": 10, "rng": rng_state(), "metrics": {}})


@pytest.mark.parametrize("damage, fragment", [("shard", "is truncated ("),
                                              ("trainer_state", "trainer_state.pt is missing")])
def test_an_unreadable_checkpoint_is_refused_on_resume_naming_it(damage, fragment, tiny_model_dir, toy_data_dir,
                                                                 tmp_path):
    from RL.checkpoint import check_checkpoint

    run_dir = tmp_path / "runs" / "run"
    write_checkpoint(run_dir, 1)
    newest = write_checkpoint(run_dir, 2)
    check_checkpoint(newest)  # what the real writers wrote passes
    if damage == "shard":
        [shard] = (newest / "actor" / "model").glob("*.distcp")
        os.truncate(shard, shard.stat().st_size - 100)
    else:
        (newest / "trainer_state.pt").unlink()
    before = sorted(path.name for path in run_dir.iterdir())
    result = run("RL.train_vlpo", vlpo_args(tmp_path, tiny_model_dir, toy_data_dir, **{"trainer.max_steps": 10}), tmp_path)
    assert_one_line(result, 2, str(newest), fragment, f"delete {newest}", "trainer.resume=false")
    assert_logged(temp_logs(tmp_path)[-1], "CheckpointError")
    assert sorted(path.name for path in run_dir.iterdir()) == before  # nothing written into the run


def test_refused_data_leaves_the_run_folder_unwritten(tiny_model_dir, tmp_path):
    (tmp_path / "data").mkdir()  # a folder holding no data files: found when the data loads, after preflight
    args = vlpo_args(tmp_path, tiny_model_dir, tmp_path / "data")
    result = run("RL.train_vlpo", args, tmp_path)
    assert_one_line(result, 2, "data.train_files", str(tmp_path / "data"))
    assert not (tmp_path / "runs").exists()  # no run folder, config.yaml or error log for a refused input
    assert temp_logs(tmp_path)  # its traceback is kept outside the run folder


def test_an_unreachable_ray_address_is_refused_in_seconds(tiny_model_dir, toy_data_dir, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    result = run("RL.train_vlpo", vlpo_args(tmp_path, tiny_model_dir, toy_data_dir), tmp_path, RAY_ADDRESS=address)
    assert_one_line(result, 2, f"RAY_ADDRESS={address}", "no Ray cluster answers")
    assert not (tmp_path / "runs").exists()


# ---- a full disk mid-run ----------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs: room for the tiny model's first checkpoint (about 13 MB), not for a second."""
    with tmpfs(tmp_path / "small_disk", "size=24m") as folder:
        yield folder


@pytest.mark.slow  # a VLPO run on Ray
def test_a_full_disk_mid_run_fails_naming_it_and_keeps_the_last_checkpoint(small_disk, ray_dir, tiny_model_dir,
                                                                           toy_data_dir, tmp_path):
    from RL.checkpoint import CheckpointManager, check_checkpoint, complete_steps

    args = vlpo_args(tmp_path, tiny_model_dir, toy_data_dir, **{
        "trainer.save_dir": small_disk, "trainer.max_steps": 4, "trainer.save_freq": 1, "trainer.save_limit": 2,
        "trainer.n_gpus_per_node": 1, "data.rollout_batch_size": 4, "worker.actor.global_batch_size": 4,
        "worker.rollout.n": 2, "data.max_response_length": 16})
    result = run("RL.train_vlpo", args, tmp_path, RAY_TMPDIR=ray_dir)
    last = assert_one_line(result, 1, "no space left writing", str(small_disk / "run"), "full traceback in")
    [log] = temp_logs(tmp_path)  # the run folder's disk is full: the log went to the temp dir
    assert str(log) in last
    assert_logged(log, "save_checkpoint")
    run_dir = small_disk / "run"
    steps = complete_steps(run_dir)
    assert steps and steps[-1][0] < 4
    check_checkpoint(steps[-1][1])  # the newest complete checkpoint is intact
    CheckpointManager(run_dir)  # what the next start does: the partial step folder goes, the complete ones stay
    assert sorted(path.name for path in run_dir.glob("step_*")) == [folder.name for _, folder in steps]
    assert [row["step"] for row in read_metrics(run_dir)][: steps[-1][0]] == list(range(1, steps[-1][0] + 1))
