"""Turn a batch of rollouts into the latent-aware model's inputs, padded or packed (padding-free)."""
from __future__ import annotations

import torch

from monet_models.transformers import latent_means, sequence_log_probs
from monet_models.transformers.packing import pack, unpack


def _cat(values):
    present = [torch.as_tensor(v) for v in values if v is not None and len(v)]
    return torch.cat(present, dim=0) if present else None


def model_inputs(batch, device) -> dict:
    """input_ids, attention_mask, pixel_values, image_grid_thw and latent_embeds for one micro-batch."""
    non = batch.non_tensors
    inputs = {
        "input_ids": batch.tensors["input_ids"].to(device),
        "attention_mask": batch.tensors["attention_mask"].to(device),
        "pixel_values": _cat(non["pixel_values"]),
        "image_grid_thw": _cat(non["image_grid_thw"]),
        "latent_embeds": _cat(non["latents"]),
    }
    for key in ("pixel_values", "image_grid_thw", "latent_embeds"):
        if inputs[key] is not None:
            inputs[key] = inputs[key].to(device)
    return inputs


def position_log_probs(module, inputs: dict, temperature: float, sigma: float, scale_by_dim: bool,
                       padding_free: bool) -> torch.Tensor:
    """(B, L) log-likelihood of every position under `module` (tokens at temperature, latents as Gaussians)."""
    return position_scores(module, inputs, temperature, sigma, scale_by_dim, padding_free)[0]


def position_scores(module, inputs: dict, temperature: float, sigma: float, scale_by_dim: bool,
                    padding_free: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`position_log_probs`, and the (latents, D) fp32 means of the latent steps in the order they were recorded
    (what the exact latent KL to the reference is computed from)."""
    pad_id = _latent_pad_id(module)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    latents = inputs["latent_embeds"]
    common = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], latent_embeds=latents,
                  latent_mode=True)
    if not padding_free:
        out = module(input_ids=ids, attention_mask=mask, **common)
        return (sequence_log_probs(out.logits, out.hidden_states, ids, latents, pad_id, temperature, sigma,
                                   scale_by_dim), latent_means(out.hidden_states, ids, pad_id))
    positions, _ = unwrapped(module).mrope_positions(ids, mask, inputs["image_grid_thw"])
    packed_ids, packed_positions, keep = pack(ids, mask, positions)
    out = module(input_ids=packed_ids, position_ids=packed_positions, **common)
    values = sequence_log_probs(out.logits, out.hidden_states, packed_ids, latents, pad_id, temperature, sigma,
                                scale_by_dim)
    return unpack(values, keep), latent_means(out.hidden_states, packed_ids, pad_id)


def unwrapped(module):
    """The latent model under optional PEFT wrapping (FSDP keeps methods on the module itself)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def _latent_pad_id(module) -> int:
    return unwrapped(module).latent_tokens.pad
