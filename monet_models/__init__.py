"""Latent-aware model code: the Qwen2.5-VL forward with latent embeddings and the latent token layout."""
from monet_models.latent_tokens import LATENT_END, LATENT_PAD, LATENT_START, LatentTokens, add_latent_tokens
from monet_models.processor import load_processor, register_processor

register_processor()  # so AutoProcessor finds the image-only processor once the package is imported

__all__ = ["LATENT_START", "LATENT_PAD", "LATENT_END", "LatentTokens", "add_latent_tokens", "load_processor"]
