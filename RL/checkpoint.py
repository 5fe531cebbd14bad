"""Run-folder checkpoints: atomic step folders, SAVE_OK markers, pruning, trainer state and RNG streams.

A checkpoint is written into `step_NNNNNN.tmp/` (the workers put `<role>/model`, `<role>/optim` and
`<role>/huggingface` there), then `finish` writes `trainer_state.pt` and `SAVE_OK` and renames the folder. A crash at
any point leaves either a `.tmp` folder (ignored by `latest`, removed by the next manager) or a complete folder, so a
resumed run always starts from a checkpoint that was fully written.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Optional

import numpy as np

from common.atomic import atomic_open, fsync_path, fsync_tree, write_atomic
from common.checkpoint_layout import DCP_METADATA, OPTIMIZER, SAVE_OK, TRAINER_STATE, WEIGHTS
from common.cli import InputError, disk_full, no_space_failure

_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^step_(\d+)(\.[a-z]+)?\.tmp$")  # step_N.tmp, step_N.old.tmp
CRASH_ENV = "LATENT_RL_CRASH_AT"


class CheckpointError(InputError):
    """A complete-looking checkpoint that cannot be read back (a truncated shard, a missing trainer state)."""


def crash_point(name: str, step: int) -> None:
    """SIGKILL this process at a named point of the save/log sequence when `LATENT_RL_CRASH_AT=<name>@<step>`.

    A failpoint: the resume tests kill a real run inside exact windows (after a step before any save, between the
    checkpoint rename and the metrics line, in the middle of pruning). Unset, it costs one environment lookup.
    """
    if os.environ.get(CRASH_ENV) == f"{name}@{int(step)}":
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointManager:
    """Owns `run_dir/step_*`; only the driver (rank 0 / the trainer process) should create one."""

    def __init__(self, run_dir: str | os.PathLike, save_limit: int = -1):
        self.run_dir = Path(run_dir)
        self.save_limit = int(save_limit)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.clean_stale()

    # ---- names -----------------------------------------------------------------------------------------------
    def step_dir(self, step: int) -> Path:
        return self.run_dir / f"step_{int(step):06d}"

    def tmp_dir(self, step: int) -> Path:
        return self.run_dir / f"step_{int(step):06d}.tmp"

    # ---- writing ---------------------------------------------------------------------------------------------
    def begin(self, step: int) -> Path:
        """A fresh `.tmp` folder for `step` (a leftover from a crashed save of the same step is removed first)."""
        tmp = self.tmp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def finish(self, step: int, trainer_state: dict) -> Path:
        """Write trainer_state.pt, then SAVE_OK, then rename tmp -> final; prune old checkpoints. Returns the folder."""
        tmp, final = self.tmp_dir(step), self.step_dir(step)
        if not tmp.is_dir():
            raise FileNotFoundError(f"{tmp} does not exist: call begin({step}) before finish({step})")
        summary = {"step": int(step), "total_steps": trainer_state.get("total_steps")}
        try:
            _atomic_torch_save(trainer_state, tmp / TRAINER_STATE)
            write_atomic(tmp / SAVE_OK, json.dumps(summary) + "\n")
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)  # never complete: free the space it took at once
            if disk_full(error):
                raise no_space_failure(tmp, error.strerror) from error
            raise
        fsync_tree(tmp)
        old = final.with_name(final.name + ".old.tmp")
        if final.exists():  # re-saving a step: move the old one aside (a .tmp, cleaned if we crash right here)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(self.run_dir)
        shutil.rmtree(old, ignore_errors=True)
        crash_point("after_rename", step)
        self.prune()
        return final

    # ---- reading ---------------------------------------------------------------------------------------------
    def complete_steps(self) -> list[tuple[int, Path]]:
        """All complete checkpoints (folders named step_N holding SAVE_OK), oldest first."""
        return complete_steps(self.run_dir)

    def latest(self) -> Optional[tuple[int, Path]]:
        """(step, folder) of the newest complete checkpoint, or None when the run has none."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    @staticmethod
    def load_trainer_state(path: str | os.PathLike) -> dict:
        """The dict given to `finish` (path: a step folder or the trainer_state.pt file itself)."""
        path = Path(path)
        if path.is_dir():
            if not (path / SAVE_OK).is_file():
                raise FileNotFoundError(f"{path} has no {SAVE_OK}: the checkpoint is incomplete")
            path = path / TRAINER_STATE
        import torch  # not at the top: the driver checks a run's checkpoints before it loads torch

        # RNG states hold numpy arrays and tuples, so this is our own trusted file: full unpickling.
        return torch.load(path, map_location="cpu", weights_only=False)

    # ---- cleaning --------------------------------------------------------------------------------------------
    def clean_stale(self) -> list[Path]:
        """Remove `.tmp` folders left by a crashed save or prune (step folders without SAVE_OK are only ignored)."""
        removed = []
        for child in list(self.run_dir.iterdir()):
            if child.is_dir() and _TMP_RE.match(child.name):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        return removed

    def prune(self) -> list[Path]:
        """Delete the oldest complete checkpoints beyond `save_limit` (<= 0 keeps all; the newest always stays)."""
        if self.save_limit <= 0:
            return []
        steps = self.complete_steps()
        doomed = steps[:-self.save_limit]
        for step, folder in doomed:
            # Rename first (atomic): a crash mid-delete leaves a `.tmp` that the next manager removes,
            # never a half-deleted folder that still looks complete.
            tmp = self.tmp_dir(step)
            if tmp.exists():
                shutil.rmtree(tmp)
            os.replace(folder, tmp)
            crash_point("during_prune", step)
            shutil.rmtree(tmp, ignore_errors=True)
        return [folder for _, folder in doomed]


def complete_steps(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, oldest first; reads only names and SAVE_OK markers."""
    run_dir = Path(run_dir)
    found = []
    for child in run_dir.iterdir() if run_dir.is_dir() else []:
        match = _STEP_RE.match(child.name)
        if match and child.is_dir() and (child / SAVE_OK).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def check_checkpoint(folder: str | os.PathLike) -> None:
    """Refuse a checkpoint that `resume` could not read, naming the file and what to do, before Ray starts.

    SAVE_OK says every file was written; a disk error or a copy can still cut one short afterwards, and the workers
    would only find out after a minute of start-up, as a traceback. Cheap: the trainer state's zip directory, and
    each DCP shard's size against the offsets its `.metadata` records (this imports torch, to unpickle them)."""
    folder = Path(folder)
    problem = next(_unreadable(folder), None)
    if problem:
        raise CheckpointError(f"{folder}: cannot resume from this checkpoint: {problem}; delete {folder} to resume "
                              "from the checkpoint before it, or set trainer.resume=false to start the run over")


def _unreadable(folder: Path):
    """What makes the checkpoint in `folder` unreadable, one problem at a time."""
    import zipfile

    state = folder / TRAINER_STATE
    if not state.is_file():
        yield f"{TRAINER_STATE} is missing"
    elif not zipfile.is_zipfile(state):
        yield f"{state} is truncated or corrupt"
    for shards in sorted(folder.glob(f"*/{WEIGHTS}")) + sorted(folder.glob(f"*/{OPTIMIZER}")):
        yield from _dcp_problems(shards)


def _dcp_problems(shards: Path):
    """A torch.distributed.checkpoint folder whose `.metadata` is missing or unreadable, or a shard shorter than
    the byte ranges the metadata records for it."""
    if not (shards / DCP_METADATA).is_file():
        yield f"{shards / DCP_METADATA} is missing"
        return
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(shards)).read_metadata().storage_data
    except Exception:  # noqa: BLE001 - an unpicklable metadata file, whatever the unpickler raised
        yield f"{shards / DCP_METADATA} is corrupt"
        return
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = shards / name
        have = path.stat().st_size if path.is_file() else None
        if have is None or have < size:
            yield f"{path} is {'missing' if have is None else f'truncated ({have} of {size} bytes)'}"


def read_summary(folder: str | os.PathLike) -> dict:
    """{"step", "total_steps"} of a complete checkpoint, from its SAVE_OK (older checkpoints: the step only)."""
    text = (Path(folder) / SAVE_OK).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"step": int(text.split()[-1]), "total_steps": None}


# ---- RNG streams -----------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) RNG states, so a resumed run draws the same numbers."""
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only when CUDA is present and the device count matches)."""
    import torch

    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _as_python_state(value):
    """random.setstate needs tuples; a state that went through a list-converting serializer is repaired here."""
    return tuple(_as_python_state(item) for item in value) if isinstance(value, (list, tuple)) else value


# ---- durable file writes ---------------------------------------------------------------------------------------
def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
