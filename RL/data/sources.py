"""Finding and opening the rows of a data set: json/jsonl/parquet files, folders of them, `save_to_disk` folders.

A folder contributes only its top-level data files (Thyme-RL keeps its validation files in `data/val`, which must not
leak into the training set). Each source remembers its folder: relative image paths resolve there unless
`data.image_dir` is set. `path@split` picks a split of a `DatasetDict` folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import datasets

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class Source:
    """Rows of one file group (or one saved data set) and the folder their relative image paths start from."""

    rows: datasets.Dataset
    base_dir: Path
    name: str


def as_path_list(files: Union[str, Iterable[str]]) -> list[str]:
    if not files:
        return []
    return [files] if isinstance(files, str) else [str(item) for item in files]


def open_sources(files: Union[str, Iterable[str]]) -> list[Source]:
    """Every source named by `files` (a path or a list of paths), in the given order."""
    sources = []
    for item in as_path_list(files):
        sources.extend(_open_one(item))
    if not sources:
        raise FileNotFoundError(f"no data files in {files!r}")
    return sources


def _open_one(item: str) -> list[Source]:
    path_text, _, split = item.partition("@") if not Path(item).exists() else (item, "", "")
    path = Path(path_text).expanduser()
    if path.is_file():
        return [_load_files([path], path.parent, path.name)]
    if not path.is_dir():
        raise FileNotFoundError(f"no such data file or folder: {path}")
    if _is_saved_dataset(path):
        return [Source(_load_saved(path, split), path, path.name + (f"@{split}" if split else ""))]
    return _load_folder(path)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split:
        return loaded[split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(f"{path} holds splits {list(loaded)}; name one as {path}@<split>")


def _load_folder(path: Path) -> list[Source]:
    files = sorted(item for item in path.iterdir() if item.suffix.lower() in BUILDERS and not item.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{path}: no .json, .jsonl or .parquet files at the top level")
    by_builder: dict[str, list[Path]] = {}
    for item in files:
        by_builder.setdefault(BUILDERS[item.suffix.lower()], []).append(item)
    return [_load_files(group, path, f"{path.name}/*{group[0].suffix}") for group in by_builder.values()]


def _load_files(files: list[Path], base_dir: Path, name: str) -> Source:
    builder = BUILDERS.get(files[0].suffix.lower())
    if builder is None:
        raise ValueError(f"{files[0]}: unsupported data file type (use .json, .jsonl, .parquet or a saved folder)")
    try:
        rows = datasets.load_dataset(builder, data_files=[str(item) for item in files], split="train")
    except Exception as error:  # the builder's message names the bad line or column
        raise ValueError(f"cannot read {name}: {error}") from error
    return Source(rows, base_dir, name)
