"""What a checkpoint folder holds and what its names mean: the one place the writers (the policy workers, the
driver's `RL.checkpoint`) and the readers (`RL.checkpoint`, `RL.model_export`, the engines) agree on.

    step_NNNNNN/<role>/model/         torch.distributed.checkpoint shards: the whole model, or only the adapter
    step_NNNNNN/<role>/optim/         the role's optimizer and learning-rate schedule, the same format
    step_NNNNNN/<role>/huggingface/   config, processor, adapter_config.json (LoRA), the run's settings
    step_NNNNNN/trainer_state.pt      step, RNG streams, the step's metrics, loader / KL / baselines
    step_NNNNNN/SAVE_OK               written last: {"step", "total_steps"}

It lives in `common` because `monet_models` (dtype names) and the driver both read it; it imports no torch, so the
driver can look at a run's checkpoints before it loads torch (`torch_dtype` imports it when called).
"""
from __future__ import annotations

import os
from pathlib import Path

SAVE_OK = "SAVE_OK"
TRAINER_STATE = "trainer_state.pt"
WEIGHTS, OPTIMIZER, HF_FILES = "model", "optim", "huggingface"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a shard folder
PEFT_PREFIX = "base_model.model."  # peft's prefix of every module name of the wrapped model

# The config's dtype names (and torch's own) -> torch's name, which vLLM takes as it is.
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}


def torch_dtype(name: str):
    """The torch dtype of a name of `DTYPE_NAMES` (KeyError for any other)."""
    import torch  # here, not at the top: see the module docstring

    return getattr(torch, DTYPE_NAMES[name])


def role_dir(step_dir: str | os.PathLike, role: str) -> Path:
    return Path(step_dir) / role


def weights_dir(role_folder: str | os.PathLike) -> Path:
    return Path(role_folder) / WEIGHTS


def optimizer_dir(role_folder: str | os.PathLike) -> Path:
    return Path(role_folder) / OPTIMIZER


def hf_files_dir(role_folder: str | os.PathLike) -> Path:
    return Path(role_folder) / HF_FILES
