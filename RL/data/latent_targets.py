"""The stage-2 latents monet3 learns: written once by the workers, sharded, resumable, read by row id.

`part_NNNNN_rR.safetensors` holds the latents (n_latents, D) of the rows rank R computed for part N (tensor names are
row ids); `part_NNNNN.done` marks a part every rank finished, so a restarted run skips it; `MANIFEST.json` is written
last, when every part is done, with what the latents were made from.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from common.atomic import write_atomic

MANIFEST = "MANIFEST.json"


class LatentTargets:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._index: dict[str, Path] | None = None

    # ---- writing ---------------------------------------------------------------------------------------------
    def complete(self) -> bool:
        return (self.folder / MANIFEST).is_file()

    def part_done(self, part: int) -> bool:
        return (self.folder / f"part_{part:05d}.done").is_file()

    def shard_path(self, part: int, rank: int) -> Path:
        return self.folder / f"part_{part:05d}_r{rank}.safetensors"

    def mark_done(self, part: int) -> None:
        (self.folder / f"part_{part:05d}.done").write_text("")

    def finish(self, summary: dict) -> None:
        """Write the manifest (atomically): the targets are complete."""
        write_atomic(self.folder / MANIFEST, json.dumps(summary, indent=2) + "\n")

    def manifest(self) -> dict:
        return json.loads((self.folder / MANIFEST).read_text())

    # ---- reading ---------------------------------------------------------------------------------------------
    def get(self, row_id: str, expected: int):
        """The latents of `row_id`; refuses a count that is not the row's number of latent pads."""
        from safetensors import safe_open

        path = self._lookup().get(row_id)
        if path is None:
            raise KeyError(f"{self.folder}: no stage-2 latents for row {row_id!r}; delete the folder to write them "
                           "again")
        with safe_open(str(path), framework="pt") as handle:
            latents = handle.get_tensor(row_id)
        if latents.shape[0] != expected:
            raise ValueError(f"row {row_id!r}: {latents.shape[0]} stored latents for {expected} latent pads; the "
                             f"targets were written with another sft.latent_size (manifest: {self.manifest()})")
        return latents

    def _lookup(self) -> dict[str, Path]:
        if self._index is None:
            from safetensors import safe_open

            self._index = {}
            for path in sorted(self.folder.glob("part_*_r*.safetensors")):
                with safe_open(str(path), framework="pt") as handle:
                    self._index.update(dict.fromkeys(handle.keys(), path))
        return self._index

