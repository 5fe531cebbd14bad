"""transformers-side latent-aware Qwen2.5-VL and the log-likelihoods of the VLPO objective."""
from __future__ import annotations

import torch

from common.checkpoint_layout import torch_dtype
from monet_models.latent_tokens import LatentTokens, add_latent_tokens
from monet_models.processor import load_processor
from monet_models.transformers.latent_qwen2_5_vl import LatentForwardOutput, LatentQwen2_5_VLForConditionalGeneration
from monet_models.transformers.log_probs import latent_log_density, latent_means, sequence_log_probs, token_log_probs


def load_latent_model(path: str, dtype: str | torch.dtype = "fp32", attn_implementation: str | None = None,
                      config_overrides: dict | None = None):
    """Load (model, processor) from a Qwen2.5-VL folder, adding the latent tokens if the tokenizer lacks them.

    `config_overrides` replace fields of the model's config.json at load (`worker.actor.model.override_config`).
    """
    from transformers import AutoConfig

    processor = load_processor(path)
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    attn = attn_implementation or ("flash_attention_2" if _flash_available() else "sdpa")
    config = override(AutoConfig.from_pretrained(path), dict(config_overrides or {}))
    model = LatentQwen2_5_VLForConditionalGeneration.from_pretrained(path, config=config, dtype=dtype,
                                                                     attn_implementation=attn)
    add_latent_tokens(processor.tokenizer, model)
    model.set_latent_tokens(LatentTokens.from_tokenizer(processor.tokenizer))
    return model, processor


def override(config, overrides: dict, where: str = "override_config"):
    """`config` with `overrides` applied; a dict value updates a sub-config (e.g. `text_config`); an unknown field
    is refused by name rather than silently ignored."""
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"{where}.{key}: the model config has no such field")
        current = getattr(config, key)
        if isinstance(value, dict) and hasattr(current, "to_dict"):
            override(current, value, f"{where}.{key}")
        else:
            setattr(config, key, value)
    return config


def _flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = [
    "LatentForwardOutput", "LatentQwen2_5_VLForConditionalGeneration", "load_latent_model", "sequence_log_probs",
    "token_log_probs", "latent_log_density", "latent_means",
]
