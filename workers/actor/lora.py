"""LoRA (peft) for the actor: targets restricted to the language model, and merged weights for the rollout."""
from __future__ import annotations

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."


def apply_lora(model, lora):
    """Wrap with PEFT LoRA on the language model only: vision MLPs share the text MLPs' module names."""
    from peft import LoraConfig, get_peft_model

    targets = DEFAULT_TARGETS if lora.target_modules in (None, "", "all-linear") else list(lora.target_modules)
    pattern = r"model\.language_model\..*\.(" + "|".join(targets) + ")"
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern,
                        bias="none")
    return get_peft_model(model, config)


def merge_lora_state_dict(state: dict, scaling: float) -> dict:
    """A PEFT state dict → plain Hugging Face names with W + scaling·B·A folded in (what the rollout engine loads)."""
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        name = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        if key.endswith(".base_layer.weight"):
            stem = key[: -len(".base_layer.weight")]
            lora_a, lora_b = state[f"{stem}.lora_A.default.weight"], state[f"{stem}.lora_B.default.weight"]
            value = value + scaling * (lora_b.float() @ lora_a.float()).to(value.dtype)
        merged[name] = value
    return merged


def lora_scaling(lora) -> float:
    return lora.alpha / lora.rank
