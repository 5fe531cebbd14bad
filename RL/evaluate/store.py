"""Where a pass's results live: `<folder>/<pass>.jsonl`, one JSON object per finished item, appended batch by batch.

Resuming reads the file back and skips the items in it. `<pass>.settings.json` records what the results depend on
(model, data, decoding and method settings, judge); resuming with different settings is refused rather than mixing
two experiments in one file. A line cut short by a crash is dropped on reading, so its item runs again.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from common.jsonl import drop_torn_line
from RL.config import ConfigError


class PassStore:
    def __init__(self, folder: Path, name: str, settings: dict, resume: bool = True):
        self.name, self.path = name, folder / f"{name}.jsonl"
        self.latent_dir = folder / "latents" / name
        settings_path = folder / f"{name}.settings.json"
        if not resume:
            for stale in (self.path, settings_path):
                stale.unlink(missing_ok=True)
            shutil.rmtree(self.latent_dir, ignore_errors=True)
        if settings_path.exists():
            _refuse_changed(json.loads(settings_path.read_text()), settings, self.path)
        folder.mkdir(parents=True, exist_ok=True)
        settings_path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        self.rows = read_rows(self.path)

    @property
    def done(self) -> set[int]:
        return {row["index"] for row in self.rows}

    def append(self, rows: list[dict]) -> None:
        """Write finished items durably (flushed and synced: a crash loses at most the batch in flight)."""
        with self.path.open("a") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            handle.flush()
            os.fsync(handle.fileno())
        self.rows += rows


def read_rows(path: Path) -> list[dict]:
    """The complete rows of a jsonl file; a torn last line is cut off the file (its item is redone)."""
    return drop_torn_line(path)


def _refuse_changed(before: dict, now: dict, path: Path) -> None:
    changed = sorted(key for key in set(before) | set(now) if before.get(key) != now.get(key))
    if changed:
        details = "; ".join(f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in changed[:4])
        raise ConfigError(f"eval.resume: {path} was written with other settings ({details}); set eval.name to a new "
                          "folder or eval.resume=false to start this pass over")
