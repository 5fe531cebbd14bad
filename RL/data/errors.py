"""The two ways the data layer says no: a whole input refused (`DataError`) and one row left out (`RowSkipped`).

`DataError` is an `InputError`, so an entry point prints it as one `error: ...` line and exits 2; its message names
the config key, file or row and what to do. `RowSkipped` never leaves the data layer: the datasets count it per
reason and report every reason at once, with one example each (`skip_summary`).
"""
from __future__ import annotations

from common.cli import InputError

IDS_IN_SUMMARY = 5  # row ids named per reason besides the example


class DataError(InputError):
    """A data file, folder, column or row set that cannot be used as given."""


class RowSkipped(Exception):
    """A row that cannot be trained on; `reason` names the counter it goes to (the datasets' SKIP_REASONS)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def skip_summary(skips: dict[str, list[tuple[str, str]]], reasons: tuple[str, ...]) -> str:
    """'reason count (e.g. row: detail; also ids); ...' for every reason in `reasons` order that has skips."""
    parts = []
    for reason in (name for name in reasons if skips.get(name)):
        (row_id, detail), others = skips[reason][0], [row for row, _ in skips[reason][1:IDS_IN_SUMMARY]]
        also = f"; also {', '.join(others)}" if others else ""
        parts.append(f"{reason} {len(skips[reason])} (e.g. {row_id}: {detail}{also})")
    return "; ".join(parts)
