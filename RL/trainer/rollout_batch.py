"""Rollout samples from the engines → one training `Batch` (prompt left-padded, response right-padded)."""
from __future__ import annotations

import numpy as np
import torch

from common.padding import left_pad, left_pad_mask, right_pad
from RL.protocol import Batch, object_array


def render_response(tokenizer, response_ids: torch.Tensor, tokens) -> str:
    """Response text for judges and logs: each latent block becomes `<latent×K>`; other specials dropped."""
    pieces, text_ids, k, ids = [], [], 0, response_ids.tolist()
    for token in ids:
        if token == tokens.pad:
            k += 1
            continue
        if k and token == tokens.end:
            pieces.append(tokenizer.decode(text_ids, skip_special_tokens=True) + f"<latent×{k}>")
            text_ids, k = [], 0
            continue
        if token != tokens.start:
            text_ids.append(token)
    tail = f"<latent×{k}>" if k else ""
    pieces.append(tokenizer.decode(text_ids, skip_special_tokens=True) + tail)
    return "".join(pieces)


def build_rollout_batch(prompts: list[dict], samples: list, n: int, pad_id: int, response_length: int) -> Batch:
    """`prompts[i]` (dataset items) owns samples[i*n:(i+1)*n]; tensors padded to fixed response_length."""
    owners = [prompts[s.prompt_index] for s in samples]
    prompt_ids = left_pad([p["input_ids"] for p in owners], pad_id)
    responses = right_pad([s.response_ids for s in samples], response_length, pad_id)
    response_mask = right_pad([s.response_mask for s in samples], response_length, 0)
    lengths = torch.tensor([min(len(s.response_ids), response_length) for s in samples])
    valid = (torch.arange(response_length)[None] < lengths[:, None]).long()
    tensors = {
        "prompts": prompt_ids,
        "responses": responses,
        "input_ids": torch.cat([prompt_ids, responses], dim=1),
        "attention_mask": torch.cat([left_pad_mask([len(p["input_ids"]) for p in owners], prompt_ids.shape[1]), valid],
                                    dim=1),
        "response_mask": response_mask * valid,
        "rollout_log_probs": right_pad([s.token_log_probs for s in samples], response_length, 0.0).float(),
    }
    non_tensors = {
        "uid": object_array(p["uid"] for p in owners),
        "pixel_values": object_array(p.get("pixel_values") for p in owners),
        "image_grid_thw": object_array(p.get("image_grid_thw") for p in owners),
        "latents": object_array(s.latents for s in samples),
        "num_blocks": np.array([len(s.block_positions) for s in samples]),
        "truncated_block": np.array([s.truncated_block for s in samples]),
        "finish_reason": object_array(s.finish_reason for s in samples),
        "ground_truth": object_array(p["ground_truth"] for p in owners),
        "raw_prompt": object_array(p["raw_prompt"] for p in owners),
        "extra": object_array(p.get("extra", {}) for p in owners),
    }
    return Batch(tensors, non_tensors)
