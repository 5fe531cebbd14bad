"""The `vllm.general_plugins` entry point (setup.py). vLLM calls `register` in every one of its processes, so
the latent model class is known wherever the engine is built, without importing anything by hand."""
from __future__ import annotations

from monet_models.vllm import LATENT_ARCHITECTURE, MODEL_CLASS


def register() -> None:
    from vllm import ModelRegistry

    if LATENT_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # A "module:Class" string: the model module (and torch device state) is imported only when the model loads.
        ModelRegistry.register_model(LATENT_ARCHITECTURE, MODEL_CLASS)
