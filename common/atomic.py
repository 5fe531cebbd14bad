"""Files and folders that appear only complete: written as `<name>.partial`, synced, then renamed to `<name>`.

A crash, a full disk or a refused row mid-write must never leave a half file under the real name, because the next
run trusts what it finds there (a resume reads metrics.jsonl, the evaluation skips converted inputs, monet3 reads
the stage-2 latents). A rename within one folder is atomic, so readers see the old file, or none, or the whole new
one; on failure the `.partial` is removed too. The one home of this rule and of the fsync calls that make it
survive a power loss. Light (no torch), so the driver's fast paths can use it.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

PARTIAL_SUFFIX = ".partial"


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield `target.partial` for the caller to write, as a file or a folder (for writers that take a path:
    safetensors, save_pretrained); when the block ends it replaces `target`, when it raises it is removed."""
    target = Path(target)
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    remove(partial)  # a leftover of a crashed write
    try:
        yield partial
        fsync_tree(partial)
        if target.is_dir():  # os.replace cannot replace a folder that holds files
            shutil.rmtree(target)
        os.replace(partial, target)
    except BaseException:
        remove(partial)
        raise
    fsync_path(target.parent)


@contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "w", **open_args) -> Iterator[IO]:
    """`open(target, mode)` whose file appears under its name only when the block ends without an error."""
    with atomic_path(target) as partial, open(partial, mode, **open_args) as handle:
        yield handle


def write_atomic(target: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `target`, atomically; returns `target`."""
    with atomic_open(target, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(target)


def remove(path: Path) -> None:
    """Delete a file or a folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_tree(root: Path) -> None:
    """Flush a file, or every file and folder under `root`, to disk (before a rename or a marker that vouches for
    them: the rename must never survive a power loss without the data)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))
    if root.is_file():
        fsync_path(root)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder fsync makes renames durable); best effort where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
