"""Starting or joining Ray: a local cluster by default, an existing one when RAY_ADDRESS is set."""
from __future__ import annotations

import os
from pathlib import Path

import ray

from RL.preflight import check_ray_address

WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0", "NCCL_DEBUG": "WARN", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
}


def init_ray(num_local_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    forwarded = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "LATENT_SIZE", "WANDB_MODE")
    env = {**WORKER_ENV, **{key: os.environ[key] for key in forwarded if key in os.environ}}
    if os.environ.get("RAY_ADDRESS"):
        check_ray_address()  # evaluation starts Ray without the trainers' preflight
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env}, log_to_driver=True)
        return
    temp_dir = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray_latent_rl"))
    temp_dir.mkdir(parents=True, exist_ok=True)
    cpus = num_local_cpus or max(8, os.cpu_count() or 1)  # logical slots: workers of two pools may share cores
    ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=str(temp_dir), runtime_env={"env_vars": env},
             log_to_driver=True, configure_logging=False)
