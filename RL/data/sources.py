"""Finding and opening the rows of a data set: json/jsonl/parquet files, folders of them, `save_to_disk` folders.

A folder contributes only its top-level data files (Thyme-RL keeps its validation files in `data/val`, which must not
leak into the training set). Each source remembers its folder: relative image paths resolve there unless
`data.image_dir` is set. `path@split` picks a split of a `DatasetDict` folder.

An empty file is refused by name. json/jsonl files are checked for UTF-8 before loading (arrow's reader may accept bad
bytes and fail later, on row access): lines that are not UTF-8 are left out, recorded on the source as `bad_encoding`
skips with their line numbers, and the rest loads.
"""
from __future__ import annotations

import codecs
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Union

import datasets
import pyarrow.parquet as pq

from RL.data.fields import shorten

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class Source:
    """Rows of one file group (or one saved data set) and the folder their relative image paths start from."""

    rows: datasets.Dataset
    base_dir: Path
    name: str
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (reason, row id, detail) found on reading


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
    for item in files:
        _refuse_empty(item, builder)
    bad = {item: _bad_lines(item) for item in files if builder == "json" and not _is_utf8(item)}
    if bad:
        return _load_without_bad_lines(files, bad, base_dir, name)
    try:
        return Source(_build(builder, files), base_dir, name)
    except Exception as error:  # the builder's message names the bad line or column
        raise ValueError(f"cannot read {name}: {shorten(str(error), 300)}") from error


def _build(builder: str, files: list[Path], **kwargs) -> datasets.Dataset:
    return datasets.load_dataset(builder, data_files=[str(item) for item in files], split="train", **kwargs)


def _refuse_empty(path: Path, builder: str) -> None:
    """An empty file is a mistake worth naming, not an obscure builder error or a silent zero rows."""
    if path.stat().st_size == 0 or (builder == "json" and _is_blank(path)):
        raise ValueError(f"{path}: empty file")
    if builder == "parquet":
        try:
            rows = pq.read_metadata(path).num_rows
        except Exception:  # noqa: BLE001 - not readable as parquet: the builder reports it
            return
        if rows == 0:
            raise ValueError(f"{path}: empty file (a parquet file with no rows)")


def _is_blank(path: Path) -> bool:
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _is_utf8(path: Path) -> bool:
    """The fast whole-file check (C speed, bounded memory) before the line-by-line one."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _bad_lines(path: Path) -> dict[int, str]:
    """Line number -> what is wrong, for every line of `path` that is not UTF-8."""
    bad = {}
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                bad[number] = f"not UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1})"
    return bad


def _load_without_bad_lines(files: list[Path], bad: dict[Path, dict[int, str]], base_dir: Path,
                            name: str) -> Source:
    """Load copies of `files` without their non-UTF-8 lines; the left-out lines become `bad_encoding` skips."""
    skipped = [("bad_encoding", f"{item.name} line {number}", detail)
               for item in bad for number, detail in bad[item].items()]
    with tempfile.TemporaryDirectory(prefix="latent_rl_data_") as tmp:
        copies = []
        for index, item in enumerate(files):
            copy = Path(tmp, f"{index}_{item.name}")
            with item.open("rb") as src, copy.open("wb") as dst:
                dst.writelines(line for number, line in enumerate(src, 1) if number not in bad.get(item, {}))
            copies.append(copy)
        try:
            rows = _build("json", copies, cache_dir=str(Path(tmp, "cache")), keep_in_memory=True)
        except Exception as error:  # e.g. a JSON array file: dropping a line breaks the rest
            first = skipped[0]
            raise ValueError(f"cannot read {name}: {first[1]} is {first[2]}, and without that line "
                             f"the file does not parse ({shorten(str(error))})") from error
    return Source(rows, base_dir, name, skipped)
