"""Prompts the evaluation builds itself (RMM's retries, critiques and memory requests), encoded exactly as the
dataset encodes its items: the processor's chat template, the configured pixel range, the engines' `PromptInput`."""
from __future__ import annotations

from RL.data.format_prompt import IMAGE_MARKER, render_prompt
from workers.rollout.base import PromptInput


def item_question(item: dict) -> str:
    """The item's question with one `<image>` marker per image (put before it when the row had none, as the dataset
    does when it builds the item's own prompt)."""
    question = item["question"]
    if IMAGE_MARKER not in question and item["images"]:
        question = IMAGE_MARKER * len(item["images"]) + question
    return question


def item_prompt(item: dict) -> PromptInput:
    return PromptInput(item["input_ids"], item.get("pixel_values"), item.get("image_grid_thw"))


def encode(processor, text: str, images: list, data) -> PromptInput:
    """`text` (with `<image>` markers for `images`) as a chat-templated prompt with its pixels."""
    size = {"shortest_edge": data.min_pixels, "longest_edge": data.max_pixels}
    inputs = processor(text=[render_prompt(processor, text)], images=images or None, size=size, return_tensors="pt")
    return PromptInput(inputs["input_ids"][0], inputs.get("pixel_values"), inputs.get("image_grid_thw"))
