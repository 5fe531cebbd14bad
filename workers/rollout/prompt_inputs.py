"""Turn a left-padded processor batch into per-prompt `PromptInput`s (what the engines take).

The processor flattens every image's patches into one `pixel_values` tensor; a prompt's share is found by
walking the images in order and matching each prompt's count of `<|image_pad|>` tokens (patches / merge²).
"""
from __future__ import annotations

from workers.rollout.base import PromptInput


def prompt_inputs_from_batch(input_ids, attention_mask, image_token_id: int, pixel_values=None, image_grid_thw=None,
                             merge_size: int = 2) -> list[PromptInput]:
    prompts, image, patch = [], 0, 0
    num_images = 0 if image_grid_thw is None else len(image_grid_thw)
    for ids, mask in zip(input_ids, attention_mask):
        ids = ids[mask.bool()]
        wanted, first_image, first_patch = int((ids == image_token_id).sum()), image, patch
        while wanted > 0 and image < num_images:
            patches = int(image_grid_thw[image].prod())
            wanted -= patches // (merge_size * merge_size)
            patch += patches
            image += 1
        if wanted != 0:
            raise ValueError("image placeholders and image_grid_thw disagree")
        if image > first_image:
            prompts.append(PromptInput(ids, pixel_values[first_patch:patch], image_grid_thw[first_image:image]))
        else:
            prompts.append(PromptInput(ids))
    return prompts
