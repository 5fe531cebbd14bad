"""The checks a run's inputs pass before Ray starts: model folders, the checkpoint a resume reads, the run folder,
and whether the run's memory plan fits its devices (RL/memory_plan.py).

Each takes milliseconds here; the same mistake found by a worker costs half a minute of start-up and ends in a Ray
traceback. They run after the config loaded (keys and types are right) and before anything is written.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from RL.checkpoint import check_checkpoint, complete_steps
from RL.config.checks import get_dotted
from RL.memory_plan import ROLES, Device, plan_memory
from common.cli import InputError, log_errors_to
from common.model_folder import check_model_folder

MODEL_KEY = "worker.actor.model.model_path"  # the reference model is the same folder


class SaveDirError(InputError):
    """A run folder that cannot be written (a read-only disk or folder)."""


class ClusterUnreachable(InputError):
    """RAY_ADDRESS names a cluster that does not answer."""


def preflight(config, model_keys: tuple[str, ...] = (MODEL_KEY,), roles: tuple[str, ...] = ROLES) -> None:
    """Refuse a damaged model folder or resume checkpoint, a read-only trainer.save_dir, or a run whose memory plan
    does not fit (`roles`: the PolicyWorker roles the trainer starts; SFT starts only the actor); then send a
    failure's traceback to the run folder (`common.cli.log_errors_to`)."""
    for key in model_keys:
        if get_dotted(config, key):
            check_model_folder(get_dotted(config, key), key)
    check_memory(config, roles)
    latest = complete_steps(config.trainer.run_dir)[-1:] if config.trainer.resume else []
    for _, folder in latest:
        check_checkpoint(folder)
    check_writable(config.trainer.run_dir, "trainer.save_dir")
    check_ray_address()
    log_errors_to(config.trainer.run_dir)


def check_memory(config, roles: tuple[str, ...] = ROLES) -> None:
    """Refuse a run whose plan exceeds a device in some phase, naming the phase, its largest parts and the keys that
    shrink them (`RL.memory_plan.MemoryPlanError`), in milliseconds instead of an out-of-memory error minutes later.
    The capacity is trainer.device_memory_gb, else the driver's GPU, else host memory per rank of a local CPU run.
    Not checked: trainer.device_memory_gb=-1, or a driver without a GPU that joins a cluster (RAY_ADDRESS), whose
    devices it cannot see."""
    gigabytes = config.trainer.device_memory_gb
    if gigabytes == -1 or not get_dotted(config, MODEL_KEY):
        return
    device = Device.detect(gigabytes or None, config.trainer.n_gpus_per_node, origin="trainer.device_memory_gb")
    if device.kind == "cpu" and os.environ.get("RAY_ADDRESS"):
        return
    plan_memory(config, device, roles=roles).check()


def check_writable(folder: str, key: str) -> None:
    """Write a scratch file in `folder` (or, before the run exists, in its nearest existing parent, so a refused run
    creates nothing), or refuse naming `key` and the folder. A real write, not the permission bits: root passes every
    permission check, a read-only mount does not."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise SaveDirError(f"{key}: cannot write the run folder {folder} ({error.strerror}); set {key} to a "
                           "writable folder") from None


def check_ray_address(address: str | None = None) -> None:
    """When RAY_ADDRESS names a cluster to join (HOST:PORT), refuse in seconds if nothing answers there: ray.init
    would otherwise retry for minutes and then hang. `auto` and `ray://` addresses are left to Ray."""
    address = os.environ.get("RAY_ADDRESS", "") if address is None else address
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ClusterUnreachable(f"RAY_ADDRESS={address}: expected HOST:PORT of the head node (ray start --head "
                                 "prints it), or unset RAY_ADDRESS to run on a local cluster")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as error:
        raise ClusterUnreachable(f"RAY_ADDRESS={address}: no Ray cluster answers there ({error.strerror or error}); "
                                 f"start it (ray start --head --port={port}) or unset RAY_ADDRESS to run on a local "
                                 "cluster") from None
