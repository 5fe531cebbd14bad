"""Reading back the JSONL files the project appends to (metrics, generations, evaluation results), after a crash.

One rule: the project appends whole lines, so a crash can cut only the LAST line short. That line is dropped (its
step or item runs again); a line that is not JSON with complete lines after it is damage no crash explains, and is
refused naming the file and the line rather than silently skipped. Blank lines are ignored.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from common.atomic import write_atomic
from common.cli import InputError

logger = logging.getLogger(__name__)


class DamagedJsonl(InputError):
    """A JSONL file with a line that is not JSON before its last line: not a torn append, so not dropped."""


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of the complete lines of `path` ([] when it does not exist); a torn last line is skipped."""
    return _parse(Path(path))[0]


def drop_torn_line(path: str | os.PathLike) -> list[dict]:
    """`read_jsonl`, and a torn last line is also cut off the file, so the next append starts on a line of its own."""
    path = Path(path)
    rows, complete = _parse(path)
    if complete is not None:
        logger.warning("%s: dropping a torn last line (an interrupted write); it runs again", path)
        write_atomic(path, complete)
    return rows


def _parse(path: Path) -> tuple[list[dict], str | None]:
    """(rows, None), or (rows, the text before a torn last line) when the last line is not JSON."""
    if not path.is_file():
        return [], None
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[number + 1:]):
                raise DamagedJsonl(f"{path} line {number + 1} is not JSON; fix or delete the file") from None
            return rows, "".join(kept + "\n" for kept in lines[:number])
    return rows, None
