"""Qwen2.5-VL whose `<abs_vis_token_pad>` positions take latent vectors as input embeddings.

Called as `model(..., latent_mode=True)`, the forward builds the input embeddings itself (token embeddings, image
features at image placeholders, latent vectors at latent pads), uses explicit mRoPE positions, and returns the
logits together with the final-norm hidden states, which are both the latent policy's means and the vectors fed
back as the next latents. Going through `forward` (not a side method) keeps FSDP's hooks in the call path.
Without `latent_mode` the model is the stock transformers one, so `generate` and checkpoints are unchanged.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from monet_models.latent_tokens import LatentTokens


def _with_latent_mode(signature: inspect.Signature) -> inspect.Signature:
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = inspect.Parameter("latent_mode", inspect.Parameter.KEYWORD_ONLY, default=False)
    var_kw = [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=params + [extra] + var_kw)


@dataclass
class LatentForwardOutput:
    logits: torch.Tensor | None  # (B, L, V), or None when compute_logits=False
    hidden_states: torch.Tensor  # (B, L, D) final post-norm hidden states
    past_key_values: object | None
    position_ids: torch.Tensor  # (3, B, L) mRoPE positions used
    rope_deltas: torch.Tensor | None  # (B, 1) set at prefill: decode position = unpadded index + delta
    image_embeds: torch.Tensor | None  # flat image features, reusable by a later call on the same images
    head_output: object = None  # what `head(hidden_states, lm_head)` returned, when a head was given


class LatentQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    latent_tokens: LatentTokens | None = None

    def set_latent_tokens(self, tokens: LatentTokens) -> None:
        """Record the latent token ids (looked up in the tokenizer that travels with this model)."""
        self.latent_tokens = tokens

    def mrope_positions(self, input_ids, attention_mask=None, image_grid_thw=None):
        """(3, B, L) positions and (B, 1) rope deltas for full sequences; padding gets position 0."""
        mm_token_type_ids = (input_ids == self.config.image_token_id).int()
        return self.model.get_rope_index(
            input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )

    def encode_images(self, pixel_values, image_grid_thw) -> torch.Tensor:
        """Flat image features (num_image_tokens, D), in placeholder order."""
        features = self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        return torch.cat(features.pooler_output, dim=0)

    def build_inputs_embeds(self, input_ids, image_embeds=None, latent_embeds=None) -> torch.Tensor:
        embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.image_token_id
        embeds = _scatter(embeds, image_mask, image_embeds, "image features", "<|image_pad|> tokens")
        if latent_embeds is not None or self.latent_tokens is not None:
            latent_mask = input_ids == self._latent_pad_id()
            embeds = _scatter(embeds, latent_mask, latent_embeds, "latent vectors", "<abs_vis_token_pad> tokens")
        return embeds

    def _latent_pad_id(self) -> int:
        if self.latent_tokens is None:
            raise RuntimeError("latent token ids unknown: call model.set_latent_tokens(LatentTokens.from_tokenizer(tok))")
        return self.latent_tokens.pad

    def forward(self, *args, latent_mode: bool = False, **kwargs):
        if not latent_mode:
            return super().forward(*args, **kwargs)
        return self.latent_forward(*args, **kwargs)

    # `generate` validates its kwargs against forward's signature: advertise the parent's, plus `latent_mode`.
    forward.__signature__ = _with_latent_mode(inspect.signature(Qwen2_5_VLForConditionalGeneration.forward))

    def latent_forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        pixel_values=None,
        image_grid_thw=None,
        image_embeds=None,
        latent_embeds=None,
        use_cache: bool = False,
        compute_logits: bool = True,
        head=None,
        mm_token_type_ids=None,  # accepted for processor-output compatibility; derived from input_ids instead
    ) -> LatentForwardOutput:
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_images(pixel_values, image_grid_thw)
        if inputs_embeds is None:
            inputs_embeds = self.build_inputs_embeds(input_ids, image_embeds, latent_embeds)
        rope_deltas = None
        if position_ids is None:
            if past_key_values is not None and past_key_values.get_seq_length() > 0:
                raise ValueError("decode steps need explicit position_ids (3, B, 1): unpadded index + rope delta")
            position_ids, rope_deltas = self.mrope_positions(input_ids, attention_mask, image_grid_thw)
        outputs = self.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache,
        )
        hidden = outputs.last_hidden_state
        if head is not None:  # e.g. chunked token log-probs: inside forward, so FSDP's hooks also cover lm_head
            return LatentForwardOutput(None, hidden, outputs.past_key_values, position_ids, rope_deltas, image_embeds,
                                       head(hidden, self.lm_head))
        logits = self.lm_head(hidden) if compute_logits else None
        return LatentForwardOutput(logits, hidden, outputs.past_key_values, position_ids, rope_deltas, image_embeds)


def _register_weight_names() -> None:
    """Load and save checkpoints with the parent's key names (transformers looks conversions up by class name)."""
    parent = get_checkpoint_conversion_mapping(Qwen2_5_VLForConditionalGeneration.__name__)
    if parent is None:
        parent = get_checkpoint_conversion_mapping("Qwen2VLForConditionalGeneration")
    if parent is not None:
        register_checkpoint_conversion_mapping(LatentQwen2_5_VLForConditionalGeneration.__name__, parent, overwrite=True)


_register_weight_names()


def _scatter(embeds, mask, values, what: str, where: str):
    count = int(mask.sum())
    provided = 0 if values is None else values.shape[0]
    if count != provided:
        raise ValueError(f"{provided} {what} for {count} {where}: they must match one to one")
    if values is None:
        return embeds
    return embeds.masked_scatter(mask.unsqueeze(-1), values.to(embeds.dtype))
