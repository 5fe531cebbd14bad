"""Latent-aware model code: the Qwen2.5-VL forward with latent embeddings and the latent token layout.

Importing the package is light (no torch, no transformers), because the config reads the latent block size from it
and config mistakes must be reported in a second. `monet_models.processor` (imported by `load_processor` and by
`monet_models.transformers`) registers the image-only processor with AutoProcessor.
"""
from monet_models.latent_tokens import LATENT_END, LATENT_PAD, LATENT_START, LatentTokens, add_latent_tokens

__all__ = ["LATENT_START", "LATENT_PAD", "LATENT_END", "LatentTokens", "add_latent_tokens", "load_processor",
           "register_processor"]


def __getattr__(name: str):
    """`load_processor` and `register_processor` import transformers, so they load on first use."""
    if name in ("load_processor", "register_processor"):
        from monet_models import processor

        return getattr(processor, name)
    raise AttributeError(f"module 'monet_models' has no attribute {name!r}")
