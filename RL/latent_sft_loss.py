"""Latent SFT (Monet/Mirage style): each latent pad is fed the previous position's final hidden state.

The hidden states depend on the latents before them, so they are found by recurrence: with every latent
unknown, one forward pass fixes the first latent of each sample exactly (attention is causal), the next pass
the second, and so on. After as many passes as the most latents in a sample, a last pass gives the logits.
Gradients flow through the whole recurrence. Cross-entropy covers text only: prompt positions, latent pads and
the forced `</abs_vis_token>` are masked, `<abs_vis_token>` is kept so the model learns when to open a block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def sft_labels(input_ids: torch.Tensor, prompt_lengths: torch.Tensor, attention_mask: torch.Tensor, tokens) -> torch.Tensor:
    """Labels for latent SFT on left-padded (prompt + response) rows; `prompt_lengths` counts padding too."""
    labels = input_ids.clone()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    labels[positions < prompt_lengths[:, None]] = IGNORE
    labels[(attention_mask == 0) | (input_ids == tokens.pad) | (input_ids == tokens.end)] = IGNORE
    return labels


def recurrent_latent_forward(model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None):
    """Forward whose latent pads hold the previous position's hidden state; returns the final LatentForwardOutput."""
    pad_mask = input_ids == model.latent_tokens.pad
    rows, cols = pad_mask.nonzero(as_tuple=True)
    passes = int(pad_mask.sum(-1).max()) if rows.numel() else 0
    latents = model.get_input_embeddings().weight.new_zeros(rows.numel(), model.config.text_config.hidden_size)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, latent_mode=True)
    out = model(pixel_values=pixel_values, image_grid_thw=image_grid_thw, latent_embeds=latents, compute_logits=passes == 0,
                **kwargs)
    for step in range(passes):
        latents = out.hidden_states[rows, cols - 1]
        out = model(image_grid_thw=image_grid_thw, image_embeds=out.image_embeds, latent_embeds=latents,
                    compute_logits=step == passes - 1, **kwargs)
    return out, latents


def latent_sft_loss(model, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None):
    """Mean cross-entropy over supervised text tokens, with latents computed by recurrence."""
    out, _ = recurrent_latent_forward(model, input_ids, attention_mask, pixel_values, image_grid_thw)
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
