"""Model export: a training checkpoint's role as a plain Hugging Face model folder (LoRA merged), or its adapter as a
PEFT folder; offline and in one process.

Reads `<step>/<role>/model` (torch.distributed.checkpoint, any world size) and `<step>/<role>/huggingface` (config,
generation config, processor, adapter_config.json with LoRA, the run's latent_config.json), the layout of
`common/checkpoint_layout.py`. The run's settings travel with the weights (monet_models/run_settings.py), so the
folder evaluates and generates as the run did. A LoRA role's checkpoint holds only its adapter: the base comes from
the adapter_config.json's base model path. Used by `python -m tools.merge_model` and by SFT's export of its model.
"""
from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from common.atomic import atomic_path
from common.checkpoint_layout import (DCP_METADATA, DTYPE_NAMES, HF_FILES, PEFT_PREFIX, SAVE_OK, TRAINER_STATE,
                                      WEIGHTS, hf_files_dir, role_dir, torch_dtype, weights_dir)
from common.cli import InputError
from monet_models.run_settings import copy_run_settings
from RL.checkpoint import complete_steps


class MergeError(InputError):
    """A checkpoint that can not be merged (not a checkpoint, incomplete, missing files, keys that do not fit the
    model): bad input the user fixes by passing another folder, so one `error:` line and exit status 2."""


def merge_checkpoint(step_dir: str | Path, role: str = "actor", out_dir: str | Path | None = None,
                     dtype: str = "auto", adapter_only: bool = False) -> Path:
    """Merge `step_dir/<role>` into a Hugging Face folder (or export its adapter); returns that folder."""
    step_dir = Path(step_dir)
    role_folder, hf_dir = _check_inputs(step_dir, role)
    out = Path(out_dir) if out_dir is not None else step_dir / _default_name(role, adapter_only)
    state = load_dcp_state_dict(weights_dir(role_folder))
    adapter = adapter_name(state)
    if adapter is None and adapter_only:
        raise MergeError(f"--adapter-only: {role_folder} holds full model weights, not a LoRA adapter")
    if adapter is None:
        model = build_model(hf_dir, state)
    else:
        model = build_adapter_model(hf_dir, state, adapter)
        if adapter_only:
            _save_adapter(model, hf_dir, out)
            return out
        model = model.merge_and_unload()
    model = model.to(_target_dtype(dtype, model.config, state))
    _save(model, hf_dir, out)
    return out


def _default_name(role: str, adapter_only: bool) -> str:
    if adapter_only:
        return f"adapter_{role}"
    return HF_FILES if role == "actor" else f"{HF_FILES}_{role}"


def adapter_name(state: dict[str, torch.Tensor]) -> str | None:
    """The adapter a state dict holds when every key is a LoRA tensor (`...lora_A.<name>.weight`), else None."""
    if not state or not all(".lora_" in key for key in state):
        return None
    names = {key.split(".lora_", 1)[1].split(".")[1] for key in state}
    if len(names) != 1:
        raise MergeError(f"the checkpoint mixes adapters {sorted(names)}; expected one per role")
    return names.pop()


def build_adapter_model(hf_dir: Path, state: dict[str, torch.Tensor], adapter: str):
    """The base model of adapter_config.json with this adapter loaded as peft's `default` (strict on LoRA keys)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from monet_models.latent_tokens import add_latent_tokens
    from monet_models.processor import load_processor

    config = LoraConfig.from_pretrained(str(hf_dir))
    base_path = config.base_model_name_or_path
    if not base_path or not Path(base_path).is_dir():
        raise MergeError(f"{hf_dir}/adapter_config.json names the base model {base_path!r}, which is not a folder "
                         "here; the base weights are needed to merge an adapter")
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
    add_latent_tokens(load_processor(str(hf_dir)).tokenizer, base)  # the size the adapter was trained on
    config.inference_mode = False
    model = get_peft_model(base, config)
    renamed = {key.replace(f".{adapter}.", ".default."): value for key, value in state.items()}
    result = model.load_state_dict(renamed, strict=False)
    missing = [key for key in result.missing_keys if ".lora_" in key]
    if missing or result.unexpected_keys:
        raise MergeError(f"the adapter does not fit the base: {len(missing)} missing LoRA key(s) {_preview(missing)}, "
                         f"{len(result.unexpected_keys)} unexpected key(s) {_preview(result.unexpected_keys)}")
    _load_generation_config(model.base_model.model, hf_dir)
    return model


def _save_adapter(model, hf_dir: Path, out: Path) -> None:
    """adapter_config.json + adapter_model.safetensors, written next to `out` first (no half folder on failure)."""
    with atomic_path(out) as partial:
        model.save_pretrained(partial)
        copy_run_settings(hf_dir, partial)


def _check_inputs(step_dir: Path, role: str) -> tuple[Path, Path]:
    if not step_dir.is_dir():
        raise MergeError(f"{step_dir} is not a folder; pass a checkpoint step folder such as runs/<run>/step_000050")
    if not (step_dir / SAVE_OK).is_file():
        if not _holds_checkpoint_parts(step_dir):
            raise MergeError(_not_a_checkpoint(step_dir))
        raise MergeError(f"{step_dir} has no {SAVE_OK}: the checkpoint was not completely written "
                         "(a crash during the save?); merge an earlier step instead")
    role_folder = role_dir(step_dir, role)
    hf_dir = hf_files_dir(role_folder)
    for needed in (weights_dir(role_folder) / DCP_METADATA, hf_dir / "config.json"):
        if not needed.is_file():
            roles = sorted(child.name for child in step_dir.iterdir() if weights_dir(child).is_dir())
            raise MergeError(f"{needed} is missing (roles in this checkpoint: {roles or 'none'})")
    return role_folder, hf_dir


def _holds_checkpoint_parts(folder: Path) -> bool:
    """Whether `folder` has what a step folder holds besides SAVE_OK (a role's model/ shards, trainer_state.pt)."""
    return (folder / TRAINER_STATE).is_file() or any(weights_dir(child).is_dir() for child in folder.iterdir())


def _not_a_checkpoint(folder: Path) -> str:
    """What a folder that is no checkpoint at all is, and the step folder to pass instead (a run folder's newest)."""
    message = (f"{folder} is not a checkpoint step folder: expected {folder}/<role>/{WEIGHTS} (the DCP shards), "
               f"{folder}/<role>/{HF_FILES} and {folder}/{SAVE_OK}; pass runs/<run>/step_NNNNNN")
    steps = complete_steps(folder)
    if steps:
        message += f" (this looks like a run folder: its newest complete checkpoint is {steps[-1][1]})"
    return message


def load_dcp_state_dict(dcp_dir: Path) -> dict[str, torch.Tensor]:
    """The full state dict of a DCP folder, via dcp_to_torch_save (no process group needed)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="merge_", dir=dcp_dir.parent) as tmp:
        path = Path(tmp) / "full_state.pt"
        dcp_to_torch_save(dcp_dir, path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    if set(state) == {"model"} and isinstance(state["model"], dict):  # saved as {"model": state_dict}
        state = state["model"]
    return state


def build_model(hf_dir: Path, state: dict[str, torch.Tensor]):
    """The model of `hf_dir/config.json` holding `state` (loaded strictly); a LoRA adapter is merged in.

    The stock class of the config (Qwen2_5_VLForConditionalGeneration; the latent subclass adds no weights) is
    built, so config.json names an architecture that the Auto classes and vLLM know.
    """
    import monet_models.processor  # noqa: F401  (processor registration for AutoProcessor)
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(hf_dir)
    with _empty_weights():  # parameters on "meta": no random init of a 7B model that is overwritten anyway
        model = AutoModelForImageTextToText.from_config(config)
    model.tie_weights()  # tied parameters become one object, so a checkpoint may hold either name
    lora = (hf_dir / "adapter_config.json").is_file()
    if lora:
        model = _wrap_lora(model, hf_dir)
    missing = load_strict(model, state)
    if lora:
        model = model.merge_and_unload()
    # assign=True replaced tied parameters one by one: link them again (towards whichever name was loaded)
    model.tie_weights(missing_keys={key.removeprefix(PEFT_PREFIX) for key in missing})
    _check_materialized(model)
    _load_generation_config(model, hf_dir)
    return model


def _empty_weights():
    try:
        from accelerate import init_empty_weights
    except ImportError:  # without accelerate: plain (slower) construction
        return nullcontext()
    return init_empty_weights(include_buffers=False)  # buffers (rotary inv_freq) are not in the state dict


def _wrap_lora(model, hf_dir: Path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig.from_pretrained(str(hf_dir))
    config.inference_mode = False
    config.base_model_name_or_path = model.name_or_path  # the base is built here, not loaded from that path
    return get_peft_model(model, config)


def load_strict(model, state: dict[str, torch.Tensor]) -> list[str]:
    """Load every key, failing with the missing/unexpected keys listed; returns the missing tied aliases.

    A missing key is accepted only when it is tied to a loaded one (lm_head.weight with tied embeddings).
    """
    aliases = _tied_aliases(model)  # before loading: assign=True unties the parameters
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in result.missing_keys if not (aliases.get(key, set()) & set(state))]
    if missing or result.unexpected_keys:
        raise MergeError(
            f"checkpoint does not fit the model of config.json: {len(missing)} missing key(s) "
            f"{_preview(missing)}, {len(result.unexpected_keys)} unexpected key(s) {_preview(result.unexpected_keys)}")
    return list(result.missing_keys)


def _tied_aliases(model) -> dict[str, set[str]]:
    """name -> other names of the same Parameter object (tied embeddings)."""
    names: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), set()).add(name)
    return {name: group - {name} for group in names.values() for name in group}


def _preview(keys: list[str], limit: int = 10) -> str:
    return str(sorted(keys)[:limit]) + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _check_materialized(model) -> None:
    left = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if left:
        raise MergeError(f"{len(left)} tensor(s) got no value from the checkpoint: {_preview(left)}")


def _load_generation_config(model, hf_dir: Path) -> None:
    if (hf_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(hf_dir)


def _target_dtype(dtype: str, config, state: dict) -> torch.dtype:
    """"auto": the dtype config.json names, else the checkpoint's floating dtype."""
    if dtype != "auto":
        if dtype not in DTYPE_NAMES:
            raise MergeError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPE_NAMES)}")
        return torch_dtype(dtype)
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, str):
        named = torch_dtype(named) if named in DTYPE_NAMES else getattr(torch, named, None)
    if isinstance(named, torch.dtype):
        return named
    floats = [tensor.dtype for tensor in state.values() if torch.is_tensor(tensor) and tensor.is_floating_point()]
    return floats[0] if floats else torch.float32


def _save(model, hf_dir: Path, out: Path) -> None:
    """save_pretrained + processor into `out`, written next to it first so a failed merge leaves no half folder."""
    from monet_models.processor import load_processor

    with atomic_path(out) as partial:
        model.save_pretrained(partial)
        load_processor(str(hf_dir)).save_pretrained(partial)
        copy_run_settings(hf_dir, partial)
