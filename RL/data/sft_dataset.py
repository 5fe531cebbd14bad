"""The latent-SFT dataset: rows of any format (RL/data/sft_rows.py) laid out as each stage trains on them.

A response step becomes tokens with a role: text and `<abs_vis_token>` are supervised, observation text is supervised
with `sft.observation_weight`, and prompt, image, latent-pad and `</abs_vis_token>` positions are not. The
`<observation>` tags mark the spans and are not put in the sequence: kept in it and masked (as the released code does),
they leave the positions before them without a target, and at inference, where the model never writes them, the
text after the block and after the observation starts from such a position (docs/sft.md).
An auxiliary image is laid out per stage:
- `inline` (monet1, and monet2's teacher): the image itself, in the response;
- `hidden` (monet2's student, and the stage-2 latents monet3 learns): the image, then a latent block; the image's
  tokens are a hidden span that only the block's latent steps see (`hidden`/`view`, monet_models latent_recurrence);
- `latent` (monet3, mirage): a latent block instead of the image.
A block is `<abs_vis_token>`, K `<abs_vis_token_pad>`, `</abs_vis_token>` (K = `sft.latent_size`), the layout RL and
inference use. Rows are checked once, eagerly; a bad row is skipped, counted in `dataset.skipped` and reported in one
warning with one example per reason (a `DataError` when no row is left), as the RL dataset does.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from common.padding import right_pad, right_pad_mask
from RL.data.errors import DataError, RowSkipped, skip_summary
from RL.data.fields import DETAIL_CHARS, shorten
from RL.data.images import (CorruptImageError, ImageTooLargeError, MissingImageError, decode_image, fitted_size,
                            load_image)
from RL.data.format_prompt import FormatPrompt, render_prompt
from RL.data.sft_rows import OBSERVATION_CLOSE, OBSERVATION_OPEN, SFTRow, detect_format, parse_row
from RL.data.sources import as_path_list, open_sources

logger = logging.getLogger(__name__)

PROMPT, TEXT, OBSERVATION, START, PAD, END, IMAGE = range(7)
SUPERVISED = (TEXT, OBSERVATION, START)
STAGE_FORMATS = {"monet1": ("monet",), "monet2": ("monet",), "monet3": ("monet",), "mirage1": ("mirage",),
                 "mirage2": ("mirage", "rl")}
STAGE_LAYOUT = {"monet1": "inline", "monet2": "hidden", "monet3": "latent", "mirage1": "latent", "mirage2": "latent"}
SKIP_REASONS = ("bad_encoding", "bad_json", "missing_key", "empty_prompt", "image_count_mismatch", "aux_image_mismatch",
                "missing_image", "corrupt_image", "image_too_large", "helper_too_small", "block_count", "overlong")
IMAGE_ERRORS = {MissingImageError: "missing_image", FileNotFoundError: "missing_image",
                ImageTooLargeError: "image_too_large", CorruptImageError: "corrupt_image"}
_TAGS = re.compile(f"({re.escape(OBSERVATION_OPEN)}|{re.escape(OBSERVATION_CLOSE)})")


class SFTDataset(Dataset):
    """Rows of `files` for `sft.stage`; items are unpadded tensors (`collate_sft` pads them into a Batch)."""

    def __init__(self, files, processor, data_config, sft_config, latent_size: int, name: str = "sft",
                 key: str = "data.train_files"):
        self.processor, self.data, self.sft, self.name, self.key = processor, data_config, sft_config, name, key
        self.stage, self.latent_size = sft_config.stage, latent_size
        self.tokenizer = processor.tokenizer
        self.merge = processor.image_processor.merge_size
        self.format_prompt = FormatPrompt(data_config.format_prompt)
        self.image_dir = Path(data_config.image_dir) if data_config.image_dir else None
        self.size = {"shortest_edge": data_config.min_pixels, "longest_edge": data_config.max_pixels}
        from monet_models.latent_tokens import LatentTokens

        self.tokens = LatentTokens.from_tokenizer(self.tokenizer)
        self.sources = open_sources(files, key)
        self.formats = [self._format(source) for source in self.sources]
        self.skipped: dict[str, int] = {}
        self.targets = None  # monet3: the stage-2 latents (RL/data/latent_targets.py), attached once written
        self._rows, skips = self._check_rows(data_config.train_max_samples, data_config.dataloader_num_workers)
        if not self._rows:
            raise DataError(f"{key}: no usable rows for sft.stage={self.stage} in {', '.join(as_path_list(files))}: "
                            f"{skip_summary(skips, SKIP_REASONS) or 'they hold no rows'}")
        if self.skipped:
            logger.warning("%s data: skipped %d rows, kept %d: %s", name, sum(self.skipped.values()), len(self._rows),
                           skip_summary(skips, SKIP_REASONS))

    def _format(self, source) -> str:
        where = f"{self.key} {source.name}"
        fmt = detect_format(source.rows.column_names, self.data.prompt_key, where)
        if fmt not in STAGE_FORMATS[self.stage]:
            raise DataError(f"sft.stage={self.stage}: {where} holds {fmt} rows; this stage trains on "
                            f"{' or '.join(STAGE_FORMATS[self.stage])} rows (docs/sft.md)")
        return fmt

    # ---- checking ----------------------------------------------------------------------------------------------
    def _check_rows(self, max_samples: int, workers: int) -> tuple[list[tuple[int, SFTRow]], dict[str, list]]:
        """Every row checked (threads decode images): (kept (source, row), reason -> [(row id, detail)])."""
        addresses = [(s, r) for s, source in enumerate(self.sources) for r in range(len(source.rows))]
        skips: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for source in self.sources:
            for reason, row_id, detail in source.skipped:
                skips[reason].append((row_id, detail))
        kept = []
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for outcome in pool.map(self._check_one, addresses):
                if isinstance(outcome, tuple) and isinstance(outcome[1], SFTRow):
                    kept.append(outcome)
                else:
                    skips[outcome[0]].append(outcome[1:])
        kept = kept[:max_samples] if max_samples > 0 else kept
        self.skipped = {reason: len(skips[reason]) for reason in SKIP_REASONS if skips[reason]}
        return kept, skips

    def _check_one(self, address: tuple[int, int]):
        """(source, row) kept, or (reason, row id, detail)."""
        source_index, row_index = address
        source = self.sources[source_index]
        row_id = f"{source.name}#{row_index}"
        try:
            row = parse_row(source.rows[row_index], self.formats[source_index], self.data, row_id)
            length = self._length(row, source.base_dir)
        except RowSkipped as skip:
            return skip.reason, row_id, skip.detail
        except UnicodeDecodeError as error:
            return "bad_encoding", row_id, shorten(str(error))
        if length > self.sft.max_length:
            return "overlong", row.row_id, f"{length} tokens > sft.max_length {self.sft.max_length}"
        return source_index, row

    def _length(self, row: SFTRow, base_dir: Path) -> int:
        """Tokens of the longest layout this stage builds, images counted from their sizes; decodes every image."""
        prompt = len(self.tokenizer(render_prompt(self.processor, self.format_prompt(row.prompt)))["input_ids"])
        prompt += sum(self._image_tokens(value, base_dir) - 1 for value in row.images)
        block = self.latent_size + 2
        response = 1
        for step in row.steps:
            if step.kind == "text":
                response += len(self.tokenizer.encode(_TAGS.sub("", step.value), add_special_tokens=False))
            elif step.kind == "latent":
                response += block
            else:
                image = self._image_tokens(step.value, base_dir) + 2
                response += {"inline": image, "hidden": image + block, "latent": block}[STAGE_LAYOUT[self.stage]]
        if self.stage == "mirage1":
            if row.helper is None:
                raise RowSkipped("missing_image", "image_output (the helper image) is null")
            if sum(step.kind == "latent" for step in row.steps) != 1:
                raise RowSkipped("block_count", "the helper image is the target of exactly one latent block")
            if self._image_tokens(row.helper, base_dir) < self.latent_size:
                raise RowSkipped("helper_too_small", f"fewer merged patches than sft.latent_size {self.latent_size}")
        return prompt + response

    def _image_tokens(self, value: Any, base_dir: Path) -> int:
        image = self._decode(value, base_dir)
        width, height = fitted_size(image.width, image.height, self.data.min_pixels, self.data.max_pixels)
        limits = {"min_pixels": self.data.min_pixels, "max_pixels": self.data.max_pixels}
        return self.processor.image_processor.get_number_of_image_patches(height, width, limits) // self.merge ** 2

    def _decode(self, value: Any, base_dir: Path):
        try:
            return decode_image(value, self.image_dir or base_dir, self.data.max_image_pixels)
        except tuple(IMAGE_ERRORS) as error:
            reason = next(name for kind, name in IMAGE_ERRORS.items() if isinstance(error, kind))
            raise RowSkipped(reason, shorten(str(error), DETAIL_CHARS)) from None

    # ---- items -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    @property
    def row_ids(self) -> list[str]:
        return [row.row_id for _, row in self._rows]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Row `index` as this stage trains on it (with monet2's teacher sequence, mirage1's helper image and
        monet3's targets)."""
        item = self.item(index, STAGE_LAYOUT[self.stage])
        source_index, row = self._rows[index]
        base_dir = self.sources[source_index].base_dir
        if self.stage == "monet2":
            teacher = self.encode(row, "inline", base_dir)
            item.update({f"teacher_{key}": teacher[key] for key in ("input_ids", "obs", "pixel_values",
                                                                     "image_grid_thw")})
        if self.stage == "mirage1":
            helper = self._pixels(row.helper, base_dir)
            item.update(helper_pixel_values=helper["pixel_values"], helper_image_grid_thw=helper["image_grid_thw"])
        if self.targets is not None:
            item["targets"] = self.targets.get(row.row_id, int((item["input_ids"] == self.tokens.pad).sum()))
        return item

    def item(self, index: int, layout: str) -> dict[str, Any]:
        """Row `index` in `layout` alone (monet3 writes its targets from the `hidden` layout)."""
        source_index, row = self._rows[index]
        return {"row_id": row.row_id, "index": index, **self.encode(row, layout, self.sources[source_index].base_dir)}

    def encode(self, row: SFTRow, layout: str, base_dir: Path) -> dict[str, torch.Tensor]:
        """input_ids, CE weights, observation mask, hidden spans and views, and the images of one row."""
        seq = _Sequence()
        prompt = render_prompt(self.processor, self.format_prompt(row.prompt))
        images = [self._load(value, base_dir) for value in row.images]
        inputs = self.processor(text=[prompt], images=images or None, size=self.size, return_tensors="pt")
        seq.add(inputs["input_ids"][0].tolist(), PROMPT)
        if images:
            seq.images.append((inputs["pixel_values"], inputs["image_grid_thw"]))
        span = 0
        for step in row.steps:
            if step.kind == "text":
                self._add_text(seq, step.value)
            elif step.kind == "latent" or layout == "latent":
                self._add_block(seq, 0)
            elif layout == "inline":
                self._add_image(seq, step.value, base_dir, 0)
            else:
                span += 1
                self._add_image(seq, step.value, base_dir, span)
                self._add_block(seq, span)
        seq.add([self.tokens.eos], TEXT)
        return seq.tensors(self.sft.observation_weight, self._patch_dim())

    def _add_text(self, seq: "_Sequence", text: str) -> None:
        inside = False
        for piece in _TAGS.split(text):
            if piece in (OBSERVATION_OPEN, OBSERVATION_CLOSE):
                inside = piece == OBSERVATION_OPEN  # a span marker, not a token (module docstring)
            elif piece:
                seq.add(self.tokenizer.encode(piece, add_special_tokens=False), OBSERVATION if inside else TEXT)

    def _add_block(self, seq: "_Sequence", span: int) -> None:
        seq.add([self.tokens.start], START)
        seq.add([self.tokens.pad] * self.latent_size, PAD, view=span)
        seq.add([self.tokens.end], END)

    def _add_image(self, seq: "_Sequence", value: Any, base_dir: Path, span: int) -> None:
        pixels = self._pixels(value, base_dir)
        count = int(pixels["image_grid_thw"].prod()) // self.merge ** 2
        seq.add([self.tokens.vision_start], IMAGE)
        seq.add([self.tokens.image_pad] * count, IMAGE, hidden=span, view=span)
        seq.add([self.tokens.vision_end], IMAGE)
        seq.images.append((pixels["pixel_values"], pixels["image_grid_thw"]))

    def _pixels(self, value: Any, base_dir: Path) -> dict[str, torch.Tensor]:
        image = self._load(value, base_dir)
        out = self.processor.image_processor(images=[image], size=self.size, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def _load(self, value: Any, base_dir: Path):
        return load_image(value, self.image_dir or base_dir, self.data.min_pixels, self.data.max_pixels,
                          self.data.max_image_pixels)

    def _patch_dim(self) -> int:
        image_processor = self.processor.image_processor
        return 3 * image_processor.temporal_patch_size * image_processor.patch_size ** 2


class _Sequence:
    """Token ids with a role, a hidden-span id and a view per position, and the images in placeholder order."""

    def __init__(self):
        self.ids: list[int] = []
        self.roles: list[int] = []
        self.hidden: list[int] = []
        self.view: list[int] = []
        self.images: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, ids: list[int], role: int, hidden: int = 0, view: int = 0) -> None:
        self.ids += ids
        self.roles += [role] * len(ids)
        self.hidden += [hidden] * len(ids)
        self.view += [view] * len(ids)

    def tensors(self, observation_weight: float, patch_dim: int) -> dict[str, torch.Tensor]:
        roles = torch.tensor(self.roles)
        weight = torch.zeros(len(roles))
        weight[(roles == TEXT) | (roles == START)] = 1.0
        weight[roles == OBSERVATION] = observation_weight
        pixels = [p for p, _ in self.images]
        grids = [g for _, g in self.images]
        return {"input_ids": torch.tensor(self.ids), "ce_weight": weight, "obs": roles == OBSERVATION,
                "hidden": torch.tensor(self.hidden), "view": torch.tensor(self.view),
                "pixel_values": torch.cat(pixels) if pixels else torch.zeros(0, patch_dim),
                "image_grid_thw": torch.cat(grids) if grids else torch.zeros(0, 3, dtype=torch.long)}


PADDED = {"input_ids": "input_ids", "ce_weight": "response_mask", "obs": "obs", "hidden": "hidden", "view": "view",
          "teacher_input_ids": "teacher_input_ids", "teacher_obs": "teacher_obs"}
PER_SAMPLE = ("row_id", "pixel_values", "image_grid_thw", "teacher_pixel_values", "teacher_image_grid_thw",
              "helper_pixel_values", "helper_image_grid_thw", "targets")


def collate_sft(items: list[dict], pad_id: int, meta: Optional[dict] = None):
    """A right-padded `Batch`: token tensors (`response_mask` holds the CE weights, so the update's global count
    is the weighted token count), attention masks, and each sample's images and targets as objects."""
    from RL.protocol import Batch

    tensors = {}
    for key, name in PADDED.items():
        if key not in items[0]:
            continue
        rows = [item[key] for item in items]
        width = max(len(row) for row in rows)
        tensors[name] = right_pad(rows, width, pad_id if key.endswith("input_ids") else 0)
        if key.endswith("input_ids"):
            tensors[name.replace("input_ids", "attention_mask")] = right_pad_mask([len(row) for row in rows], width)
    non_tensors = {key: [item[key] for item in items] for key in PER_SAMPLE if key in items[0]}
    return Batch(tensors, non_tensors, meta)


def sft_dataset(config, processor, latent_size: int, files: Optional[Any] = None) -> SFTDataset:
    """The dataset of the `sft` section: the rows of `files`, else of `data.train_files`."""
    return SFTDataset(files or config.data.train_files, processor, config.data, config.sft, latent_size)
