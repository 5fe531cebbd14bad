"""Collating prompt items into a left-padded batch, and turning that batch into a `Batch` for the workers."""
from __future__ import annotations

from typing import Any, Optional

import torch

from RL.protocol import Batch, left_pad

PADDED_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
PER_SAMPLE_KEYS = ("raw_prompt", "images", "question", "ground_truth", "row_id", "index", "extra")


class PromptCollator:
    """Left-pads the token tensors (generation appends on the right), concatenates the image features in sample
    order, and keeps the per-sample objects as lists. A class, not a closure, so DataLoader workers can pickle it."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in PADDED_KEYS:
            fill = self.pad_token_id if key == "input_ids" else 0
            batch[key] = left_pad([item[key] for item in items], fill)
        batch["pixel_values"] = torch.cat([item["pixel_values"] for item in items])
        batch["image_grid_thw"] = torch.cat([item["image_grid_thw"] for item in items])
        batch["num_images"] = torch.tensor([len(item["image_grid_thw"]) for item in items])
        batch["num_patches"] = torch.tensor([item["pixel_values"].shape[0] for item in items])
        for key in PER_SAMPLE_KEYS:
            batch[key] = [item[key] for item in items]
        return batch


def to_batch(collated: dict[str, Any], meta: Optional[dict[str, Any]] = None) -> Batch:
    """A `Batch`: padded token tensors in `tensors`; each sample's own `pixel_values` and `image_grid_thw` in
    `non_tensors` (so repeat/reorder/chunk keep images with their prompts), plus the per-sample objects."""
    patches = collated["num_patches"].tolist()
    images = collated["num_images"].tolist()
    tensors = {key: collated[key] for key in PADDED_KEYS}
    non_tensors = {key: collated[key] for key in PER_SAMPLE_KEYS}
    non_tensors["pixel_values"] = list(torch.split(collated["pixel_values"], patches))
    non_tensors["image_grid_thw"] = list(torch.split(collated["image_grid_thw"], images))
    return Batch(tensors, non_tensors, meta)


def vision_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """`pixel_values` and `image_grid_thw` of all samples of `batch`, concatenated in sample order for the model."""
    return {"pixel_values": torch.cat(list(batch.non_tensors["pixel_values"])),
            "image_grid_thw": torch.cat(list(batch.non_tensors["image_grid_thw"]))}
