"""LoRA (peft): one named adapter per policy on one frozen base, restricted to the language model.

The Qwen2.5-VL vision blocks name their MLPs `gate_proj`/`up_proj`/`down_proj` like the text layers, so plain
module names would also adapt the vision tower; the target regex anchors every match in `model.language_model`.
"""
from __future__ import annotations

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_config(lora):
    """The peft `LoraConfig` of the `worker.actor.model.lora` section."""
    from peft import LoraConfig

    targets = DEFAULT_TARGETS if lora.target_modules in (None, "", "all-linear") else tuple(lora.target_modules)
    pattern = r"model\.language_model\..*\.(" + "|".join(targets) + ")"
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern,
                      exclude_modules=lora.exclude_modules or None, bias="none")


def apply_lora(model, lora, adapters: list[str]):
    """Wrap `model` with one adapter per name (B = 0 at start, so every adapter begins as the base model)."""
    from peft import get_peft_model

    first, *rest = adapters
    wrapped = get_peft_model(model, lora_config(lora), adapter_name=first)
    for name in rest:
        wrapped.add_adapter(name, lora_config(lora))
    return wrapped


def is_adapter_key(name: str, adapter: str) -> bool:
    """Whether a parameter or state-dict key belongs to `adapter` (`...lora_A.<adapter>.weight`)."""
    return f".{adapter}." in name and ".lora_" in name


def saved_adapter_key(name: str, adapter: str) -> str:
    """`adapter`'s parameter name in peft's saved naming (`...lora_A.<adapter>.weight` -> `...lora_A.weight`): what
    adapter folders and the rollout engines take, whatever the adapter is called inside the training model."""
    return name.replace(f".{adapter}.", ".")

