"""Turn a training checkpoint into a plain Hugging Face model folder (LoRA merged), offline and in one process.

    python -m tools.merge_model RUN_STEP_DIR [--role actor] [--out DIR] [--dtype auto|fp32|bf16|fp16] [--adapter-only]

Reads `RUN_STEP_DIR/<role>/model` (torch.distributed.checkpoint, any world size) and `RUN_STEP_DIR/<role>/huggingface`
(config, generation config, processor, adapter_config.json with LoRA, the run's latent_config.json), and writes
`RUN_STEP_DIR/huggingface/` (`huggingface_<role>/` for roles other than actor), loadable with
`AutoModelForImageTextToText` / `AutoProcessor` (after `import monet_models.processor`) or by vLLM. The run's settings
(latent_config.json, its prompt template, generation_config.json) travel with the weights, so the merged folder
evaluates and generates as the run did without its training config (monet_models/run_settings.py). A LoRA role's
checkpoint holds only its adapter: the base comes from the adapter_config.json's base model path. `--adapter-only`
writes that adapter as a PEFT folder instead (`adapter_<role>/`, loadable with `PeftModel.from_pretrained(base,
folder)`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from monet_models.run_settings import copy_run_settings
from RL.checkpoint import complete_steps
from common.cli import ArgumentParser, InputError, run_cli

SAVE_OK = "SAVE_OK"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
PEFT_PREFIX = "base_model.model."


class MergeError(InputError):
    """A checkpoint that can not be merged (not a checkpoint, incomplete, missing files, keys that do not fit the
    model): bad input the user fixes by passing another folder, so one `error:` line and exit status 2."""


def merge_checkpoint(step_dir: str | Path, role: str = "actor", out_dir: str | Path | None = None,
                     dtype: str = "auto", adapter_only: bool = False) -> Path:
    """Merge `step_dir/<role>` into a Hugging Face folder (or export its adapter); returns that folder."""
    step_dir = Path(step_dir)
    role_dir, hf_dir = _check_inputs(step_dir, role)
    out = Path(out_dir) if out_dir is not None else step_dir / _default_name(role, adapter_only)
    state = load_dcp_state_dict(role_dir / "model")
    adapter = adapter_name(state)
    if adapter is None and adapter_only:
        raise MergeError(f"--adapter-only: {role_dir} holds full model weights, not a LoRA adapter")
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
    return "huggingface" if role == "actor" else f"huggingface_{role}"


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
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    copy_run_settings(hf_dir, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _check_inputs(step_dir: Path, role: str) -> tuple[Path, Path]:
    if not step_dir.is_dir():
        raise MergeError(f"{step_dir} is not a folder; pass a checkpoint step folder such as runs/<run>/step_000050")
    if not (step_dir / SAVE_OK).is_file():
        if not _holds_checkpoint_parts(step_dir):
            raise MergeError(_not_a_checkpoint(step_dir))
        raise MergeError(f"{step_dir} has no {SAVE_OK}: the checkpoint was not completely written "
                         "(a crash during the save?); merge an earlier step instead")
    role_dir = step_dir / role
    hf_dir = role_dir / "huggingface"
    for needed in (role_dir / "model" / ".metadata", hf_dir / "config.json"):
        if not needed.is_file():
            roles = sorted(child.name for child in step_dir.iterdir() if (child / "model").is_dir())
            raise MergeError(f"{needed} is missing (roles in this checkpoint: {roles or 'none'})")
    return role_dir, hf_dir


def _holds_checkpoint_parts(folder: Path) -> bool:
    """Whether `folder` has what a step folder holds besides SAVE_OK (a role's model/ shards, trainer_state.pt)."""
    return (folder / "trainer_state.pt").is_file() or any((child / "model").is_dir() for child in folder.iterdir())


def _not_a_checkpoint(folder: Path) -> str:
    """What a folder that is no checkpoint at all is, and the step folder to pass instead (a run folder's newest)."""
    message = (f"{folder} is not a checkpoint step folder: expected {folder}/<role>/model (the DCP shards), "
               f"{folder}/<role>/huggingface and {folder}/{SAVE_OK}; pass runs/<run>/step_NNNNNN")
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
        if dtype not in DTYPES:
            raise MergeError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, str):
        named = DTYPES.get(named) or getattr(torch, named, None)
    if isinstance(named, torch.dtype):
        return named
    floats = [tensor.dtype for tensor in state.values() if torch.is_tensor(tensor) and tensor.is_floating_point()]
    return floats[0] if floats else torch.float32


def _save(model, hf_dir: Path, out: Path) -> None:
    """save_pretrained + processor into `out`, written next to it first so a failed merge leaves no half folder."""
    from monet_models.processor import load_processor

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    load_processor(str(hf_dir)).save_pretrained(tmp)
    copy_run_settings(hf_dir, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m tools.merge_model", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step_dir", help="a checkpoint folder such as runs/<run>/step_000050")
    parser.add_argument("--role", default="actor", help="actor (default), solver, proposer ...")
    parser.add_argument("--out", default=None, help="output folder (default STEP_DIR/huggingface)")
    parser.add_argument("--dtype", default="auto", help="auto (config.json's dtype), fp32, bf16 or fp16")
    parser.add_argument("--adapter-only", action="store_true",
                        help="write the role's LoRA adapter as a PEFT folder instead of a merged model")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = merge_checkpoint(args.step_dir, args.role, args.out, args.dtype, args.adapter_only)
    files = sorted(path.name for path in out.iterdir())
    print(json.dumps({"merged": str(out), "seconds": round(time.perf_counter() - start, 2), "files": files}))


if __name__ == "__main__":
    run_cli(main)
