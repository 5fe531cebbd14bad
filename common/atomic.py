"""Files and folders that appear only complete: written as `<name>.partial`, synced, then renamed to `<name>`.

A crash, a full disk or a refused row mid-write must never leave a half file under the real name, because the next
run trusts what it finds there (a resume reads metrics.jsonl, the evaluation skips converted inputs, monet3 reads
the stage-2 latents). A rename within one folder is atomic, so readers see the old file, or none, or the whole new
one; on failure the `.partial` is removed too. The one home of this rule and of the fsync calls that make it
survive a power loss. What appears also has the permissions a plain `open()` under the user's umask gives
(`umask_permissions`). Light (no torch), so the driver's fast paths can use it.
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
        umask_permissions(partial)
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


def umask_permissions(root: str | os.PathLike) -> None:
    """Give a file, or every file and folder under `root`, at least the permissions a plain `open()` / `mkdir()`
    gives under the process's umask (0644 / 0755 for the usual 022).

    Some writers create their output privately and rename it into place: safetensors 0.8 writes every
    `*.safetensors` 0600, so a merged model folder could not be read by the other users of a shared machine or by a
    serving account. Permissions are only widened up to what the umask allows, never narrowed."""
    root = Path(root)
    mask = current_umask()
    paths = [root] + ([Path(folder) / name for folder, dirs, files in os.walk(root) for name in dirs + files]
                      if root.is_dir() else [])
    for path in paths:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o7777
        wanted = mode | ((0o777 if path.is_dir() else 0o666 | (mode & 0o111)) & ~mask)
        if wanted != mode:
            os.chmod(path, wanted)


def current_umask() -> int:
    """The process's umask, read without changing it (Linux reports it in /proc); elsewhere set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
