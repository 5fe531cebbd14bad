"""The per-latent recurrence: one full forward pass per latent, the plain definition of what the fast KV-cached
rounds of `latent_recurrence.py` compute. Kept as the reference the fast one is tested against (tests/test_sft_*)
and timed against (`python -m tools.bench_sft`)."""
from __future__ import annotations

import torch

from monet_models.transformers.latent_recurrence import base_model, captured_layers, image_features


def visibility_mask(attention_mask, hidden=None, view=None) -> torch.Tensor:
    """(B, 1, L, L) bool: causal, valid keys, hidden spans only for their view; every row sees itself (no NaN rows)."""
    batch, length = attention_mask.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    if hidden is not None:
        visible = (hidden[:, None, :] == 0) | (hidden[:, None, :] == view[:, :, None])
        allowed &= visible
    allowed |= torch.eye(length, dtype=torch.bool, device=attention_mask.device)[None]
    return allowed[:, None]


def exact_latent_forward(model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *, hidden=None,
                         view=None, layers=()):
    """The per-latent recurrence: with every latent unknown, pass i fixes the i-th latent of each sample (attention is
    causal), so after as many passes as the most latents in a sample one more pass gives the outputs. Returns
    (last pass output, latents (pads, D) row-major, {layer: (B, L, D)}); gradients flow through every pass."""
    base = base_model(model)
    pads = input_ids == base.latent_tokens.pad
    rows, cols = pads.nonzero(as_tuple=True)
    passes = int(pads.sum(-1).max()) if rows.numel() else 0
    positions, _ = base.mrope_positions(input_ids, attention_mask, image_grid_thw)
    mask = visibility_mask(attention_mask, hidden, view)
    images = image_features(model, pixel_values, image_grid_thw) if pixel_values is not None else None
    latents = torch.zeros(rows.numel(), base.config.text_config.hidden_size, device=input_ids.device)
    for step in range(passes + 1):
        with captured_layers(model, layers) as calls:
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, image_embeds=images,
                        latent_embeds=latents, latent_mode=True)
        if step < passes:
            latents = out.hidden_states[rows, cols - 1]
    return out, latents, {index: values[0] for index, values in calls.items()}
