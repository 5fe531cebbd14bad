"""Finding and opening the rows of a data set: json/jsonl/parquet files, folders of them, `save_to_disk` folders.

A folder contributes only its top-level data files (Thyme-RL keeps its validation files in `data/val`, which must not
leak into the training set). Each source remembers its folder: relative image paths resolve there unless
`data.image_dir` is set. `path@split` picks a split of a `DatasetDict` folder.

Anything that cannot be read at all (no such path, a folder without data files, an empty file, a file that is not
parquet, a missing split) is a `DataError` naming the config key and the path. Bad lines of a json/jsonl file are
left out instead, so one broken line does not cost the whole file: lines that are not UTF-8 (checked before loading,
since arrow's reader may accept bad bytes and fail later, on row access) become `bad_encoding` skips, and when the
json reader refuses the file, lines that are not a JSON object become `bad_json` skips; both carry the line number,
and the rest loads. The line scan runs only when something is wrong, so good files load at arrow's speed.
"""
from __future__ import annotations

import codecs
import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Union

import datasets
import pyarrow.parquet as pq

from RL.data.errors import DataError, skip_summary
from RL.data.fields import shorten

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
WHAT_TO_NAME = "name a .json, .jsonl or .parquet file, a folder holding such files, or a save_to_disk folder"
LINE_REASONS = ("bad_encoding", "bad_json")
FORM_HINTS = {"json": "a .json/.jsonl file holds one JSON object per line, or a JSON list of objects",
              "parquet": "write it again with pandas.DataFrame.to_parquet or datasets.Dataset.to_parquet"}


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


def open_sources(files: Union[str, Iterable[str]], key: str = "data.train_files") -> list[Source]:
    """Every source named by `files` (a path or a list of paths), in the given order; `key` is the config key the
    paths came from, named in every refusal."""
    items = as_path_list(files)
    if not items:
        raise DataError(f"{key}: no data given; {WHAT_TO_NAME}")
    try:
        return [source for item in items for source in _open_one(item)]
    except DataError as error:
        raise DataError(f"{key}: {error}") from error


def _open_one(item: str) -> list[Source]:
    path_text, _, split = item.partition("@") if not Path(item).exists() else (item, "", "")
    path = Path(path_text).expanduser()
    if not path.exists():
        raise DataError(f"no such file or folder: {path}; {WHAT_TO_NAME}")
    if split and not _is_saved_dataset(path):
        raise DataError(f"{item}: @{split} names a split, and only a save_to_disk folder has splits; "
                        f"name {path} alone")
    if path.is_file():
        return [_load_files([path], path.parent, path.name)]
    if _is_saved_dataset(path):
        return [Source(_load_saved(path, split), path, path.name + (f"@{split}" if split else ""))]
    return _load_folder(path)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # a damaged folder: datasets' message names the file it missed
        raise DataError(f"cannot read the save_to_disk folder {path}: {shorten(str(error), 200)}") from error
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split and split not in loaded:
        raise DataError(f"{path} has no split {split!r}; its splits: {', '.join(loaded)} (name one as "
                        f"{path}@<split>)")
    if split:
        return loaded[split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise DataError(f"{path} holds splits {', '.join(loaded)}; name one as {path}@<split>")


def _load_folder(path: Path) -> list[Source]:
    files = sorted(item for item in path.iterdir() if item.suffix.lower() in BUILDERS and not item.name.startswith("."))
    if not files:
        raise DataError(f"the folder {path} holds no .json, .jsonl or .parquet files at its top level (subfolders "
                        f"are not read); {WHAT_TO_NAME}")
    by_builder: dict[str, list[Path]] = {}
    for item in files:
        by_builder.setdefault(BUILDERS[item.suffix.lower()], []).append(item)
    return [_load_files(group, path, f"{path.name}/*{group[0].suffix}") for group in by_builder.values()]


def _load_files(files: list[Path], base_dir: Path, name: str) -> Source:
    """The rows of `files` (one builder); bad json lines are left out as skips when the reader refuses them."""
    builder = BUILDERS.get(files[0].suffix.lower())
    if builder is None:
        raise DataError(f"{files[0]}: unsupported data file type {files[0].suffix or '(no suffix)'!r}; "
                        f"{WHAT_TO_NAME}")
    for item in files:
        _refuse_unreadable(item, builder)
    bad = {item: _bad_lines(item) for item in files if builder == "json" and not _is_utf8(item)}
    if not bad:
        try:
            return Source(_build(builder, files), base_dir, name)
        except Exception as error:  # noqa: BLE001 - the builder raises many types; the line scan says which line
            bad = {item: lines for item in files if builder == "json" and (lines := _bad_lines(item))}
            if not bad:
                raise DataError(f"cannot read {name}: {_read_problem(files, builder, error)}; "
                                f"{FORM_HINTS[builder]}") from error
    return _load_without_bad_lines(files, bad, base_dir, name)


def _read_problem(files: list[Path], builder: str, error: Exception) -> str:
    """Where a JSON list file stops parsing (the builder does not say), else the builder's innermost message."""
    for item in files if builder == "json" else []:
        if _is_json_list(item):
            try:
                json.loads(item.read_text(encoding="utf-8"))
            except json.JSONDecodeError as bad:
                return f"{item.name} line {bad.lineno} column {bad.colno} is not valid JSON ({bad.msg})"
    while error.__cause__ is not None:
        error = error.__cause__
    return shorten(str(error), 300)


def _build(builder: str, files: list[Path], **kwargs) -> datasets.Dataset:
    with _builder_quiet():
        return datasets.load_dataset(builder, data_files=[str(item) for item in files], split="train", **kwargs)


@contextmanager
def _builder_quiet() -> Iterator[None]:
    """The json builder logs "Failed to load JSON" before it raises; the skip or refusal reported here replaces it
    (a file that loads once its bad lines are left out must not look as if it failed)."""
    builder_logger = logging.getLogger("datasets.packaged_modules.json.json")
    level = builder_logger.level
    builder_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        builder_logger.setLevel(level)


def _refuse_unreadable(path: Path, builder: str) -> None:
    """An empty file or a parquet file that is not one is a mistake worth naming, not an obscure builder error or
    a silent zero rows."""
    if path.stat().st_size == 0 or (builder == "json" and _is_blank(path)):
        raise DataError(f"{path}: empty file")
    if builder == "parquet":
        try:
            rows = pq.read_metadata(path).num_rows
        except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a file that is not parquet
            raise DataError(f"{path}: not a parquet file ({shorten(str(error), 120)}); "
                            f"{FORM_HINTS['parquet']}") from error
        if rows == 0:
            raise DataError(f"{path}: empty file (a parquet file with no rows)")


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


def _bad_lines(path: Path) -> dict[int, tuple[str, str]]:
    """Line number -> (reason, what is wrong) for every line of `path` that is not UTF-8 and, unless the file is
    one JSON list (whose lines are not rows), every non-blank line that is not a JSON object."""
    rows_per_line = not _is_json_list(path)
    bad = {}
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                byte = f"0x{line[error.start]:02x}"
                bad[number] = ("bad_encoding", f"not UTF-8 (byte {byte} at column {error.start + 1})")
                continue
            problem = _json_row_problem(text) if rows_per_line and text.strip() else None
            if problem:
                bad[number] = ("bad_json", problem)
    return bad


def _is_json_list(path: Path) -> bool:
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 16):
            if chunk.strip():
                return chunk.lstrip()[:1] == b"["
    return False


def _json_row_problem(line: str) -> str | None:
    """What keeps one line from being a row: not JSON, or JSON that is not an object; None for a good row."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        return f"not valid JSON: {error.msg} (column {error.colno}): {shorten(line.strip(), 60)}"
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__}, not an object: {shorten(line.strip(), 60)}"
    return None


def _load_without_bad_lines(files: list[Path], bad: dict[Path, dict[int, tuple[str, str]]], base_dir: Path,
                            name: str) -> Source:
    """Load copies of `files` without their bad lines; the left-out lines become skips with their line numbers."""
    skipped = [(reason, f"{item.name} line {number}", detail)
               for item in bad for number, (reason, detail) in bad[item].items()]
    with tempfile.TemporaryDirectory(prefix="latent_rl_data_") as tmp:
        copies = []
        for index, item in enumerate(files):
            copy = Path(tmp, f"{index}_{item.name}")
            with item.open("rb") as src, copy.open("wb") as dst:
                dst.writelines(line for number, line in enumerate(src, 1) if number not in bad.get(item, {}))
            copies.append(copy)
        if all(_is_blank(copy) for copy in copies):
            raise DataError(f"cannot read {name}: nothing is left without its bad lines: {_summary(skipped)}; "
                            f"{FORM_HINTS['json']}")
        try:
            rows = _build("json", copies, cache_dir=str(Path(tmp, "cache")), keep_in_memory=True)
        except Exception as error:  # e.g. a JSON array file: dropping a line breaks the rest
            first = skipped[0]
            raise DataError(f"cannot read {name}: {first[1]} is {first[2]}, and without that line "
                            f"the file does not parse ({shorten(str(error))})") from error
    return Source(rows, base_dir, name, skipped)


def _summary(skipped: list[tuple[str, str, str]]) -> str:
    by_reason: dict[str, list[tuple[str, str]]] = {}
    for reason, row_id, detail in skipped:
        by_reason.setdefault(reason, []).append((row_id, detail))
    return skip_summary(by_reason, LINE_REASONS)
