"""The RL prompt dataset: rows of (question, images, answer) -> model-ready prompts.

Every row is checked once, eagerly, when the dataset is built, so a bad row never crashes a run hours in: a
non-UTF-8 or malformed JSON line, a missing key, an empty question, a null, missing, corrupt or over-size image, a
marker/image count mismatch or an overlong prompt skips the row, counts it in `dataset.skipped` and is reported in ONE
warning with one example (row and detail) per reason; when no row is left, that report is the `DataError`. A
question with images but no `<image>` marker (Thyme-RL's form) gets one marker per image before the text, as Monet
builds its prompts, and that is announced once. The prompt length check computes each image's token count from its
size (the processor's own formula) instead of running the image processor on every row, which is what makes EasyR1's
overlong filter slow on large VLM data sets.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from RL.data.columns import check_columns
from RL.data.errors import DataError, RowSkipped, skip_summary
from RL.data.fields import DETAIL_CHARS, shorten
from RL.data.images import (DEFAULT_MAX_IMAGE_PIXELS, CorruptImageError, ImageTooLargeError, MissingImageError,
                            as_image_list, decode_image, fitted_size, load_image)
from RL.data.format_prompt import IMAGE_MARKER, FormatPrompt, render_prompt
from RL.data.sources import Source, as_path_list, open_sources

logger = logging.getLogger(__name__)

SKIP_REASONS = ("bad_encoding", "bad_json", "missing_key", "empty_prompt", "image_count_mismatch", "missing_image",
                "corrupt_image", "image_too_large", "overlong_prompt")
READ_ERRORS = {UnicodeDecodeError: "bad_encoding", MissingImageError: "missing_image",  # first match wins
               FileNotFoundError: "missing_image", ImageTooLargeError: "image_too_large",
               Image.DecompressionBombError: "image_too_large", CorruptImageError: "corrupt_image"}
CHECK_CHUNK = 256


@dataclass(frozen=True)
class KeptRow:
    source: int
    row: int
    row_id: str
    prompt_length: int
    markers_added: bool = False


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
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # a decoded image over this is skipped (image_too_large)
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
    """Prompts for rollouts. Items are unpadded; the rollout engines pad them per request.

        RLPromptDataset(cfg.data.train_files, processor, cfg.data)            # from the config section
        RLPromptDataset("train.jsonl", processor, max_prompt_length=512)      # or keyword options
    """

    def __init__(self, files: Union[str, Iterable[str]], processor, options: Any = None, *, max_samples: int = -1,
                 name: str = "train", key: str = "", **overrides: Any):
        self.options = options = DatasetOptions.of(options, **overrides)
        self.processor = processor
        self.prompt_key, self.answer_key, self.image_key = options.prompt_key, options.answer_key, options.image_key
        self.image_dir = Path(options.image_dir) if options.image_dir else None
        self.max_prompt_length = options.max_prompt_length
        self.format_prompt = FormatPrompt(options.format_prompt)
        self.min_pixels, self.max_pixels = options.min_pixels, options.max_pixels
        self.filter_overlong_prompts = options.filter_overlong_prompts
        self.name = name
        self.key = key or ("data.train_files" if name == "train" else "data.val_files")  # named in refusals
        self.image_token_id = processor.image_token_id
        self.merge_size = processor.image_processor.merge_size
        self.max_image_pixels = options.max_image_pixels
        self.sources = open_sources(files, self.key)
        for source in self.sources:
            check_columns(source, options, self.key)
        self.has_images = any(_has_images(source.rows, self.image_key) for source in self.sources)
        self.skipped: dict[str, int] = {}
        self.markers_added = 0
        self._kept, skips = self._check_rows(max_samples, options.dataloader_num_workers)
        if not self._kept:
            raise DataError(self._no_rows_message(files, skips))
        self._report(skips, len(self._kept))

    @classmethod
    def from_config(cls, data_config, processor, split: str = "train") -> "RLPromptDataset":
        """The train or val dataset described by the `data` config section."""
        files = data_config.train_files if split == "train" else data_config.val_files
        max_samples = data_config.train_max_samples if split == "train" else data_config.val_max_samples
        return cls(files, processor, data_config, max_samples=max_samples, name=split)

    # ------------------------------------------------------------------------------------------- checking
    def _check_rows(self, max_samples: int, num_workers: int) -> tuple[list[KeptRow], dict[str, list]]:
        """Check rows in order (threads decode images), stop at `max_samples` kept rows: (kept, reason -> skips)."""
        addresses = [(s, r) for s, source in enumerate(self.sources) for r in range(len(source.rows))]
        kept: list[KeptRow] = []
        skips: dict[str, list[tuple[str, str]]] = defaultdict(list)  # reason -> [(row id, detail)]
        for source in self.sources:
            for reason, row_id, detail in source.skipped:
                skips[reason].append((row_id, detail))
        with ThreadPoolExecutor(max(1, num_workers)) as pool, \
                tqdm(total=len(addresses), desc=f"checking {self.name} data", unit="row") as progress:
            for start in range(0, len(addresses), CHECK_CHUNK):
                for outcome in pool.map(self._check_one, addresses[start:start + CHECK_CHUNK]):
                    progress.update(1)
                    if isinstance(outcome, KeptRow):
                        kept.append(outcome)
                    else:
                        skips[outcome[0]].append(outcome[1:])
                if 0 < max_samples <= len(kept):
                    break
        kept = kept[:max_samples] if max_samples > 0 else kept
        self.skipped = {reason: len(skips[reason]) for reason in SKIP_REASONS if skips[reason]}
        self.markers_added = sum(row.markers_added for row in kept)
        return kept, skips

    def _no_rows_message(self, files, skips: dict[str, list[tuple[str, str]]]) -> str:
        """Every reason with its count and one example, the files, and the keys the rows were read by."""
        found = skip_summary(skips, SKIP_REASONS) or "they hold no rows"
        images_from = self.image_dir or "each data file's folder"
        return (f"{self.key}: no usable rows in {', '.join(as_path_list(files))}: {found}; rows were read with "
                f"data.prompt_key={self.prompt_key}, data.answer_key={self.answer_key}, "
                f"data.image_key={self.image_key}, relative image paths from {images_from} (data.image_dir)")

    def _report(self, skips: dict[str, list[tuple[str, str]]], kept: int) -> None:
        """One warning for the skipped rows (one example with its detail per reason), one for added markers."""
        if self.markers_added:
            logger.warning("%s data: %d rows had images but no %s marker in %r; one marker per image was put "
                           "before the question", self.name, self.markers_added, IMAGE_MARKER, self.prompt_key)
        if self.skipped:
            logger.warning("%s data: skipped %d rows, kept %d: %s", self.name, sum(self.skipped.values()), kept,
                           skip_summary(skips, SKIP_REASONS))

    def _check_one(self, address: tuple[int, int]) -> Union[KeptRow, tuple[str, str, str]]:
        """The kept row, or (reason, row id, detail)."""
        source_index, row_index = address
        source = self.sources[source_index]
        row_id = f"{source.name}#{row_index}"
        try:
            row = self._read(source, row_index)
            row_id = _row_id(row, source, row_index)
            length, markers_added = self._prompt_length(row, source)
        except RowSkipped as skip:
            return skip.reason, row_id, skip.detail
        if length > self.max_prompt_length and self.filter_overlong_prompts:
            return "overlong_prompt", row_id, f"{length} tokens > data.max_prompt_length {self.max_prompt_length}"
        return KeptRow(source_index, row_index, row_id, length, markers_added)

    def _read(self, source: Source, row_index: int) -> dict[str, Any]:
        """The raw row; a `datasets` Image column decodes here, so its failures are image failures."""
        try:
            return source.rows[row_index]
        except Exception as error:
            raise _read_skip(error) from None

    def _prompt_length(self, row: dict[str, Any], source: Source) -> tuple[int, bool]:
        """(tokens of the templated prompt with every image expanded to its feature count, markers added)."""
        text, raw_images, markers_added = self._prompt_parts(row)
        image_tokens = []
        for value in raw_images:
            image = self._decode(value, source)
            width, height = fitted_size(image.width, image.height, self.min_pixels, self.max_pixels)
            image_tokens.append(self._tokens_for_size(width, height))
        text_tokens = len(self.processor.tokenizer(render_prompt(self.processor, text))["input_ids"])
        return text_tokens - len(image_tokens) + sum(image_tokens), markers_added  # each placeholder expands

    def _prompt_parts(self, row: dict[str, Any]) -> tuple[str, list, bool]:
        """(formatted question with one marker per image, raw image values, whether markers were added)."""
        question, answer = row.get(self.prompt_key), row.get(self.answer_key)
        if not isinstance(question, str) or answer is None:
            raise RowSkipped("missing_key", self.prompt_key if not isinstance(question, str) else self.answer_key)
        if not question.strip():
            raise RowSkipped("empty_prompt", f"{self.prompt_key} is {shorten(question)!r}")
        value = row.get(self.image_key)
        markers = question.count(IMAGE_MARKER)
        if value is None and (markers or self.has_images):
            raise RowSkipped("missing_image", f"{self.image_key} is null")
        raw_images = as_image_list(value)
        added = markers == 0 and bool(raw_images)
        if added:  # Monet's prompt: <image> + question
            question = IMAGE_MARKER * len(raw_images) + question
        text = self.format_prompt(question)
        if text.count(IMAGE_MARKER) != len(raw_images):
            raise RowSkipped("image_count_mismatch", f"{text.count(IMAGE_MARKER)} markers, {len(raw_images)} images")
        return text, raw_images, added

    def _decode(self, value: Any, source: Source):
        try:
            return decode_image(value, self.image_dir or source.base_dir, self.max_image_pixels)
        except (MissingImageError, CorruptImageError, ImageTooLargeError) as error:
            raise _read_skip(error) from None

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

    def __getitem__(self, index: int) -> dict[str, Any]:
        kept = self._kept[index]
        source = self.sources[kept.source]
        row = source.rows[kept.row]
        text, raw_images, _ = self._prompt_parts(row)
        raw_prompt = render_prompt(self.processor, text)
        images = [load_image(value, self.image_dir or source.base_dir, self.min_pixels, self.max_pixels,
                             self.max_image_pixels) for value in raw_images]
        item = self._encode(raw_prompt, images, kept)
        answer = row[self.answer_key]
        item.update(raw_prompt=raw_prompt, images=images, question=row[self.prompt_key], row_id=kept.row_id,
                    index=index,
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
    return shorten(str(value)) if value not in (None, "") else f"{source.name}#{row_index}"


def _has_images(rows, image_key: str) -> bool:
    """Whether any row of `rows` has a non-null image value (read from the Arrow null count: nothing decodes)."""
    if image_key not in rows.column_names or not len(rows):
        return False
    return rows.data.column(image_key).null_count < len(rows.data)


def _read_skip(error: Exception) -> RowSkipped:
    """The skip for a failure to read a row or decode its images, by exception type; unknown = corrupt_image."""
    reason = next((name for kind, name in READ_ERRORS.items() if isinstance(error, kind)), "corrupt_image")
    return RowSkipped(reason, shorten(str(error), DETAIL_CHARS))


def build_datasets(data_config, processor) -> tuple[RLPromptDataset, Optional[RLPromptDataset]]:
    """The train dataset and, when `data.val_files` is set, the validation dataset."""
    train = RLPromptDataset.from_config(data_config, processor, "train")
    val = RLPromptDataset.from_config(data_config, processor, "val") if data_config.val_files else None
    return train, val
