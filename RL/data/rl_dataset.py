"""The RL prompt dataset: rows of (question with `<image>` markers, images, answer) -> model-ready prompts.

Every row is checked once, eagerly, when the dataset is built, so a bad row never crashes a run hours in: a missing
key, a missing or corrupt image, a marker/image count mismatch or an overlong prompt skips the row, counts it in
`dataset.skipped` and is reported in ONE warning with the first row ids per reason. The prompt length check computes
each image's token count from its size (the processor's own formula) instead of running the image processor on
every row, which is what makes EasyR1's overlong filter slow on large VLM data sets.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from RL.data.collate import PromptCollator
from RL.data.images import (CorruptImageError, MissingImageError, as_image_list, decode_image, fitted_size,
                            load_image)
from RL.data.prompts import IMAGE_MARKER, FormatPrompt, render_prompt
from RL.data.sources import Source, open_sources

logger = logging.getLogger(__name__)

SKIP_REASONS = ("missing_key", "image_count_mismatch", "missing_image", "corrupt_image", "overlong_prompt")
IDS_IN_WARNING = 5
CHECK_CHUNK = 256


class RowSkipped(Exception):
    """A row that cannot be trained on; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class KeptRow:
    source: int
    row: int
    row_id: str
    prompt_length: int


@dataclass
class DatasetOptions:
    """The `data` config keys the dataset reads (a `DataConfig` works wherever these are accepted)."""

    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"
    image_dir: str = ""  # "" = each data file's own folder
    max_prompt_length: int = 4096
    format_prompt: str = ""
    min_pixels: int = 262144
    max_pixels: int = 3136000
    filter_overlong_prompts: bool = True
    dataloader_num_workers: int = 0  # threads that decode images during the load-time check

    @classmethod
    def of(cls, source: Any = None, **overrides: Any) -> "DatasetOptions":
        """Options from a `DataConfig` (or anything with these attributes), then keyword overrides."""
        values = {name: getattr(source, name) for name in cls.__dataclass_fields__ if hasattr(source, name)}
        unknown = set(overrides) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown dataset options {sorted(unknown)}")
        return cls(**{**values, **overrides})


class RLPromptDataset(Dataset):
    """Prompts for rollouts. Items are unpadded; `collate_fn` left-pads them into a batch.

        RLPromptDataset(cfg.data.train_files, processor, cfg.data)            # from the config section
        RLPromptDataset("train.jsonl", processor, max_prompt_length=512)      # or keyword options
    """

    def __init__(self, files: Union[str, Iterable[str]], processor, options: Any = None, *, max_samples: int = -1,
                 name: str = "train", **overrides: Any):
        self.options = options = DatasetOptions.of(options, **overrides)
        self.processor = processor
        self.prompt_key, self.answer_key, self.image_key = options.prompt_key, options.answer_key, options.image_key
        self.image_dir = Path(options.image_dir) if options.image_dir else None
        self.max_prompt_length = options.max_prompt_length
        self.format_prompt = FormatPrompt(options.format_prompt)
        self.min_pixels, self.max_pixels = options.min_pixels, options.max_pixels
        self.filter_overlong_prompts = options.filter_overlong_prompts
        self.name = name
        self.image_token_id = processor.image_token_id
        self.merge_size = processor.image_processor.merge_size
        self.sources = open_sources(files)
        self.skipped: dict[str, int] = {}
        self._kept = self._check_rows(max_samples, options.dataloader_num_workers)
        if not self._kept:
            raise ValueError(f"{name} data {files!r}: no usable rows (skipped: {self.skipped})")

    @classmethod
    def from_config(cls, data_config, processor, split: str = "train") -> "RLPromptDataset":
        """The train or val dataset described by the `data` config section."""
        files = data_config.train_files if split == "train" else data_config.val_files
        max_samples = data_config.train_max_samples if split == "train" else data_config.val_max_samples
        return cls(files, processor, data_config, max_samples=max_samples, name=split)

    # ------------------------------------------------------------------------------------------- checking
    def _check_rows(self, max_samples: int, num_workers: int) -> list[KeptRow]:
        """Check rows in order (threads decode images), stop at `max_samples` kept rows, warn once."""
        addresses = [(s, r) for s, source in enumerate(self.sources) for r in range(len(source.rows))]
        kept: list[KeptRow] = []
        skipped_ids: dict[str, list[str]] = defaultdict(list)
        with ThreadPoolExecutor(max(1, num_workers)) as pool, \
                tqdm(total=len(addresses), desc=f"checking {self.name} data", unit="row") as progress:
            for start in range(0, len(addresses), CHECK_CHUNK):
                for outcome in pool.map(self._check_one, addresses[start:start + CHECK_CHUNK]):
                    progress.update(1)
                    if isinstance(outcome, KeptRow):
                        kept.append(outcome)
                    else:
                        skipped_ids[outcome[0]].append(outcome[1])
                if 0 < max_samples <= len(kept):
                    break
        self.skipped = {reason: len(skipped_ids[reason]) for reason in SKIP_REASONS if skipped_ids[reason]}
        self._warn_skipped(skipped_ids, len(kept))
        return kept[:max_samples] if max_samples > 0 else kept

    def _warn_skipped(self, skipped_ids: dict[str, list[str]], kept: int) -> None:
        if not self.skipped:
            return
        parts = [f"{reason} {len(ids)} (e.g. {', '.join(ids[:IDS_IN_WARNING])})"
                 for reason, ids in skipped_ids.items() if ids]
        logger.warning("%s data: skipped %d rows, kept %d: %s", self.name, sum(self.skipped.values()), kept,
                       "; ".join(parts))

    def _check_one(self, address: tuple[int, int]) -> Union[KeptRow, tuple[str, str]]:
        source_index, row_index = address
        source = self.sources[source_index]
        row_id = f"{source.name}#{row_index}"
        try:
            row = self._read(source, row_index)
            row_id = _row_id(row, source, row_index)
            length = self._prompt_length(row, source)
        except RowSkipped as skip:
            return skip.reason, row_id
        if length > self.max_prompt_length and self.filter_overlong_prompts:
            return "overlong_prompt", row_id
        return KeptRow(source_index, row_index, row_id, length)

    def _read(self, source: Source, row_index: int) -> dict[str, Any]:
        """The raw row; a `datasets` Image column decodes here, so its failures are image failures."""
        try:
            return source.rows[row_index]
        except FileNotFoundError as error:
            raise RowSkipped("missing_image", str(error)) from None
        except Exception as error:
            raise RowSkipped("corrupt_image", str(error)) from None

    def _prompt_length(self, row: dict[str, Any], source: Source) -> int:
        """Tokens of the templated prompt with every image expanded to its feature count."""
        text = self._question_text(row)
        raw_images = self._raw_images(row, text)
        image_tokens = []
        for value in raw_images:
            image = self._decode(value, source)
            width, height = fitted_size(image.width, image.height, self.min_pixels, self.max_pixels)
            image_tokens.append(self._tokens_for_size(width, height))
        text_tokens = len(self.processor.tokenizer(render_prompt(self.processor, text))["input_ids"])
        return text_tokens - len(image_tokens) + sum(image_tokens)  # each image placeholder expands

    def _question_text(self, row: dict[str, Any]) -> str:
        question, answer = row.get(self.prompt_key), row.get(self.answer_key)
        if not isinstance(question, str) or answer is None:
            missing = self.prompt_key if not isinstance(question, str) else self.answer_key
            raise RowSkipped("missing_key", missing)
        return self.format_prompt(question)

    def _raw_images(self, row: dict[str, Any], text: str) -> list:
        markers = text.count(IMAGE_MARKER)
        if markers and row.get(self.image_key) is None:
            raise RowSkipped("missing_key", self.image_key)
        raw_images = as_image_list(row.get(self.image_key))
        if markers != len(raw_images):
            raise RowSkipped("image_count_mismatch", f"{markers} markers, {len(raw_images)} images")
        return raw_images

    def _decode(self, value: Any, source: Source):
        try:
            return decode_image(value, self.image_dir or source.base_dir)
        except MissingImageError as error:
            raise RowSkipped("missing_image", str(error)) from None
        except CorruptImageError as error:
            raise RowSkipped("corrupt_image", str(error)) from None

    def _tokens_for_size(self, width: int, height: int) -> int:
        limits = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
        patches = self.processor.image_processor.get_number_of_image_patches(height, width, limits)
        return patches // self.merge_size ** 2

    # ------------------------------------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self._kept)

    @property
    def prompt_lengths(self) -> list[int]:
        return [kept.prompt_length for kept in self._kept]

    @property
    def collate_fn(self) -> PromptCollator:
        return PromptCollator(self.processor.tokenizer.pad_token_id)

    def __getitem__(self, index: int) -> dict[str, Any]:
        kept = self._kept[index]
        source = self.sources[kept.source]
        row = source.rows[kept.row]
        question = row[self.prompt_key]
        raw_prompt = render_prompt(self.processor, self.format_prompt(question))
        images = [load_image(value, self.image_dir or source.base_dir, self.min_pixels, self.max_pixels)
                  for value in as_image_list(row.get(self.image_key))]
        item = self._encode(raw_prompt, images, kept)
        answer = row[self.answer_key]
        item.update(raw_prompt=raw_prompt, images=images, question=question, row_id=kept.row_id, index=index,
                    ground_truth=str(answer) if isinstance(answer, (int, float)) else answer,
                    extra={key: value for key, value in row.items()
                           if key not in (self.prompt_key, self.answer_key, self.image_key)})
        return item

    def _encode(self, raw_prompt: str, images: list, kept: KeptRow) -> dict[str, torch.Tensor]:
        size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        inputs = self.processor(text=[raw_prompt], images=images or None, size=size, return_tensors="pt")
        input_ids = inputs["input_ids"][0]
        if "pixel_values" in inputs:
            pixel_values, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        else:
            pixel_values, grid = torch.zeros(0, self._patch_dim()), torch.zeros(0, 3, dtype=torch.long)
        self._check_image_tokens(input_ids, pixel_values, grid, kept.row_id)
        if "mm_token_type_ids" in inputs:
            token_types = inputs["mm_token_type_ids"][0]
        else:
            token_types = (input_ids == self.image_token_id).long()
        return {"input_ids": input_ids, "attention_mask": inputs["attention_mask"][0],
                "mm_token_type_ids": token_types, "pixel_values": pixel_values, "image_grid_thw": grid}

    def _patch_dim(self) -> int:
        image_processor = self.processor.image_processor
        return 3 * image_processor.temporal_patch_size * image_processor.patch_size ** 2

    def _check_image_tokens(self, input_ids, pixel_values, grid, row_id: str) -> None:
        """Never let an image-token/feature mismatch reach the model (EasyR1's most reported crash)."""
        patches = int(grid.prod(-1).sum()) if len(grid) else 0
        tokens = int((input_ids == self.image_token_id).sum())
        if tokens != patches // self.merge_size ** 2 or pixel_values.shape[0] != patches:
            raise RuntimeError(f"row {row_id}: {tokens} image tokens, {pixel_values.shape[0]} patches, "
                               f"grid {grid.tolist()} (merge {self.merge_size}): prompt and features disagree")
        if len(input_ids) > self.max_prompt_length and self.filter_overlong_prompts:
            raise RuntimeError(f"row {row_id}: {len(input_ids)} prompt tokens > data.max_prompt_length "
                               f"{self.max_prompt_length} although it passed the length check")


def _row_id(row: dict[str, Any], source: Source, row_index: int) -> str:
    value = row.get("id")
    return str(value) if value not in (None, "") else f"{source.name}#{row_index}"


def build_datasets(data_config, processor) -> tuple[RLPromptDataset, Optional[RLPromptDataset]]:
    """The train dataset and, when `data.val_files` is set, the validation dataset."""
    train = RLPromptDataset.from_config(data_config, processor, "train")
    val = RLPromptDataset.from_config(data_config, processor, "val") if data_config.val_files else None
    return train, val
