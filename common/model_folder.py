"""Is this a complete Qwen2.5-VL model folder? Checked in milliseconds, before any worker loads it.

Loading an incomplete folder fails deep inside transformers ("Unrecognized processing class" for a folder without
processor files) or, for a truncated `model.safetensors`, inside a Ray worker half a minute after start. The file
list and each safetensors file's length against its own header name the folder and the file instead.
Light: the standard library only.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator, Optional

from common.cli import InputError

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
CONFIG = "config.json"
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
OTHER_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
REQUIRED = (("config.json", (CONFIG,)), ("processor files (processor_config.json)", PROCESSOR_FILES),
            ("tokenizer files (tokenizer.json)", TOKENIZER_FILES))  # what it lacks -> any one of these files


class ModelFolderError(InputError):
    """A model folder that is missing, incomplete or holds a damaged weights file."""


def check_model_folder(path: str, key: str) -> None:
    """Refuse `path` (the value of config key or option `key`) unless it is a complete model folder; a hub id
    already in the local Hugging Face cache is left to transformers."""
    folder = Path(path)
    if not folder.is_dir():
        if HUB_ID.fullmatch(path) and _in_hub_cache(path):
            return
        raise ModelFolderError(f"{key}: no such folder {path}; give a Qwen2.5-VL model folder")
    lacks = [what for what, names in REQUIRED if not any((folder / name).is_file() for name in names)]
    if not _weight_files(folder) and not any((folder / name).is_file() for name in OTHER_WEIGHTS):
        lacks.append(f"weights ({SAFETENSORS})")
    if lacks:
        raise ModelFolderError(f"{key}: {path} is not a complete Qwen2.5-VL model folder: it lacks "
                               f"{', '.join(lacks)}; point {key} at the folder a training run or merge_model wrote")
    for weights in _weight_files(folder):
        problem = safetensors_problem(weights)
        if problem:
            raise ModelFolderError(f"{key}: {weights} {problem}; copy the model folder again (or re-run the merge "
                                   "or export that wrote it)")


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files a folder's weights are in: model.safetensors, or the shards its index names."""
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS]
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return []
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelFolderError(f"{index}: not a safetensors index (no weight_map); copy the model folder again") \
            from None
    return [folder / name for name in shards]


def safetensors_problem(path: Path) -> Optional[str]:
    """What is wrong with a safetensors file, or None: it must exist and be as long as its header's data offsets."""
    if not path.is_file():
        return "is missing (named by the model's safetensors index)"
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or length > size - 8:
            return f"is truncated or not a safetensors file ({size} bytes, no complete header)"
        header = handle.read(length)
    try:
        end = max(_data_ends(json.loads(header)), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "is corrupt (its safetensors header is not valid)"
    needed = 8 + length + end
    return f"is truncated ({size} of {needed} bytes)" if size < needed else None


def _data_ends(header: dict) -> Iterator[int]:
    for name, entry in header.items():
        if name != "__metadata__":
            yield int(entry["data_offsets"][1])


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds `repo_id` (the only way a hub id loads with the hub offline)."""
    home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE", os.environ.get("HUGGINGFACE_HUB_CACHE", Path(home) / "hub")))
    return (cache / f"models--{repo_id.replace('/', '--')}").is_dir()
