"""vLLM's Qwen2.5-VL with latent inputs: `<abs_vis_token_pad>` positions are fed the previous position's final-norm
hidden state (plus noise), which the latent logits processor left in the `LatentChannel` when it placed the pad.

Selected per engine with `hf_overrides={"architectures": [LATENT_ARCHITECTURE]}`; the checkpoint is unchanged.
It also accepts images already turned into `pixel_values` by the project's processor (the rollout engine receives
prompts that way), as `multi_modal_data={"image": {"pixel_values": ..., "image_grid_thw": ...}}`; this needs
`enable_mm_embeds=True` and `mm_device_do_normalize=False` (the pixels are already normalised).
"""
from __future__ import annotations

import torch
from transformers import AutoTokenizer
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import Qwen2VLMultiModalDataParser
from vllm.multimodal import MULTIMODAL_REGISTRY

from monet_models.latent_tokens import LatentTokens
from monet_models.vllm.channel import LatentChannel


class PixelValuesDataParser(Qwen2VLMultiModalDataParser):
    """Image dicts hold the processor's `pixel_values` and `image_grid_thw` (not precomputed embeddings)."""

    embedding_fields = {
        **Qwen2VLMultiModalDataParser.embedding_fields,
        "image": {"pixel_values": "values", "image_grid_thw": "metadata"},
    }


class PixelValuesProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_data_parser(self):
        return PixelValuesDataParser(
            self.get_hf_config().vision_config.spatial_merge_size,
            video_needs_metadata=True,
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )


@MULTIMODAL_REGISTRY.register_processor(
    Qwen2_5_VLMultiModalProcessor, info=PixelValuesProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class LatentQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    # vLLM then passes the token ids beside the embeddings, so the forward can find the latent pads.
    requires_raw_input_tokens = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        model_config = vllm_config.model_config
        tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer,
                                                  trust_remote_code=model_config.trust_remote_code)
        self.latent_channel = LatentChannel(LatentTokens.from_tokenizer(tokenizer), len(tokenizer),
                                            self.config.text_config.hidden_size, model_config.dtype,
                                            vllm_config.scheduler_config.max_num_seqs)
        LatentChannel.publish(self.latent_channel)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        metadata = _attention_metadata()
        if metadata is not None and input_ids is not None and inputs_embeds is not None:
            inputs_embeds = self._feed_latents(input_ids, inputs_embeds, metadata)
        hidden = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if metadata is not None:
            num_reqs = metadata.seq_lens.shape[0]
            self.latent_channel.last_slots = metadata.slot_mapping[metadata.query_start_loc[1:num_reqs + 1] - 1]
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        self.latent_channel.hidden = hidden_states  # one row per request: its last scheduled position
        return super().compute_logits(hidden_states)

    def _feed_latents(self, input_ids, inputs_embeds, metadata) -> torch.Tensor:
        num_tokens = int(metadata.query_start_loc[-1])
        pads = (input_ids[:num_tokens] == self.latent_channel.tokens.pad).nonzero().flatten()
        if pads.numel() == 0:
            return inputs_embeds
        previous = previous_slots(pads, metadata, self.vllm_config.cache_config.block_size)
        return inputs_embeds.index_put((pads,), self.latent_channel.read(previous))


def _attention_metadata():
    """The decoder's attention metadata of this forward (None in profiling runs)."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):
        raise RuntimeError("latent decoding does not support micro-batching (ubatching)")
    if not metadata:
        return None
    return next(iter(metadata.values()))


def previous_slots(pads: torch.Tensor, metadata, block_size: int) -> torch.Tensor:
    """KV slot of the position before each pad input, from the block table.

    A pad must open its request's chunk: a pad later in a chunk means its latent would come from this very forward,
    which happens only when vLLM recomputes a preempted request; that cannot reproduce the latents, so it fails.
    """
    starts = metadata.query_start_loc.long()
    request = torch.searchsorted(starts[1:], pads, right=True)
    if not torch.equal(starts[request], pads):
        raise RuntimeError("a latent request is being recomputed (preempted or prefix-cached): its latents cannot be "
                           "reproduced. Give the engine more KV cache or fewer concurrent sequences")
    query_len = starts[request + 1] - starts[request]
    position = metadata.seq_lens[request].long() - query_len  # the pad's own position
    own = _slot(metadata.block_table, request, position, block_size)
    if not torch.equal(own, metadata.slot_mapping[pads].to(own.dtype)):
        raise RuntimeError(f"block-table arithmetic (block size {block_size}) disagrees with vLLM's slot mapping")
    return _slot(metadata.block_table, request, position - 1, block_size)


def _slot(block_table, request, position, block_size):
    return block_table[request, position // block_size].long() * block_size + position % block_size
