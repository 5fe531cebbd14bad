"""How to run a model folder, written beside its weights: `latent_config.json`, its prompt template, and the sampling
and stop tokens in `generation_config.json` (docs/design.md §6).

A latent model answers correctly only with the settings it was trained with (its block size K, its prompt template,
its image pixel range, its stop tokens). Kept only in the training config, they were lost with the checkpoint: a
merged VLPO model evaluated without that config answered with no latent block at all (12.5% instead of 92%). So every
model folder the project writes (a checkpoint's `huggingface/` folder, a merged checkpoint, an SFT output) carries
them, and whatever loads the folder (a run's config, `tools.generate`, `RL.evaluate`, vLLM) takes them as defaults.
One writer (`write_run_settings`), one reader (`read_run_settings`); light to import (no torch), because the config
reads it before refusing a bad command line.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

LATENT_CONFIG = "latent_config.json"
PROMPT_FILE = "format_prompt.jinja"  # a copy of the template the run used: the folder must not depend on a repo path
VERSION = 1

# latent_config.json field -> the config key it was read from and is the default of when the folder is loaded
CONFIG_KEYS = {
    "latent_size": "worker.rollout.latent_size",
    "sampling_strategy": "worker.rollout.sampling_strategy",
    "latent_noise_std": "worker.rollout.monet.latent_noise_std",
    "latent_noise_scale": "worker.rollout.monet.latent_noise_scale",
    "min_pixels": "data.min_pixels",
    "max_pixels": "data.max_pixels",
    "max_response_length": "data.max_response_length",
}
# self-evolution's roles wrap their prompts in their own templates, not in data.format_prompt
ROLE_PROMPTS = {"solver": "self_evolution.solver_prompt", "proposer": "self_evolution.proposer_prompt"}
FIELD_TYPES = {"latent_size": int, "sampling_strategy": str, "latent_noise_std": (int, float),
               "latent_noise_scale": str, "min_pixels": int, "max_pixels": int, "max_response_length": int,
               "format_prompt": str, "stop_tokens": list,
               "latent_render": str}  # optional, written by hand: how tools.serve shows blocks (count | omit)


class RunSettingsError(ValueError):
    """A model folder's latent_config.json that cannot be read; the message names the file."""


# ---------------------------------------------------------------------------------------------------------- writer
def settings_from_config(config, policy: str = "actor") -> dict[str, Any]:
    """What a run's config says about running `policy`'s model: the latent_config.json fields, the path of the
    template its prompts went through, and the validation sampling (how the run answered held-out questions)."""
    rollout = config.worker.rollout
    values = {field: _dotted(config, key) for field, key in CONFIG_KEYS.items()}
    prompt = _dotted(config, ROLE_PROMPTS.get(policy, "data.format_prompt")) or ""
    sampling = {"temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": rollout.top_k,
                **{key: value for key, value in dict(rollout.val_override_config).items()
                   if key in ("temperature", "top_p", "top_k")}}
    return {**values, "format_prompt": prompt, "sampling": sampling}


def write_run_settings(folder: str | Path, settings: dict[str, Any], tokenizer, generation_config=None) -> None:
    """latent_config.json, the template copy and (given the model's generation config) generation_config.json with
    the stop tokens and the sampling of `settings` (from `settings_from_config`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stop_ids = _stop_token_ids(tokenizer, generation_config)
    prompt = settings.get("format_prompt") or ""
    if prompt:
        shutil.copyfile(prompt, folder / PROMPT_FILE)
    record = {"version": VERSION, **{field: settings[field] for field in CONFIG_KEYS},
              "format_prompt": PROMPT_FILE if prompt else "",
              "format_prompt_source": Path(prompt).name if prompt else "",
              "stop_tokens": tokenizer.convert_ids_to_tokens(stop_ids)}
    _write_json(folder / LATENT_CONFIG, record)
    if generation_config is not None:
        _generation_config(generation_config, settings["sampling"], stop_ids).save_pretrained(folder)


def copy_run_settings(source: str | Path, target: str | Path) -> None:
    """Carry a folder's latent_config.json and template into a folder made from it (a merge writes its own
    generation_config.json from the loaded model)."""
    for name in (LATENT_CONFIG, PROMPT_FILE):
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(target) / name)


def _stop_token_ids(tokenizer, generation_config) -> list[int]:
    """The tokenizer's EOS and the generation config's, in that order, each once."""
    configured = getattr(generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(int(i) for i in [tokenizer.eos_token_id, *configured] if i is not None))


def _generation_config(generation_config, sampling: dict, stop_ids: list[int]):
    """A copy of the model's generation config with the run's sampling (greedy when its temperature is 0)."""
    copy = type(generation_config).from_dict(generation_config.to_dict())
    copy.eos_token_id = stop_ids
    sampled = sampling["temperature"] > 0
    copy.do_sample = sampled
    copy.temperature = sampling["temperature"] if sampled else None
    copy.top_p = sampling["top_p"] if sampled else None
    copy.top_k = sampling["top_k"] if sampled and sampling["top_k"] > 0 else None
    return copy


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def _dotted(config, key: str) -> Any:
    for name in key.split("."):
        config = getattr(config, name)
    return config


# ---------------------------------------------------------------------------------------------------------- reader
def read_run_settings(folder: str | Path) -> dict[str, Any]:
    """The settings `folder`'s latent_config.json records ({} when it has none, as for a hub model): each field of
    `CONFIG_KEYS` it holds, `format_prompt` as an absolute path ("" = none) and `stop_tokens`."""
    path = Path(folder) / LATENT_CONFIG
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunSettingsError(f"{path}: cannot read it ({error}); delete it to run without the folder's settings, "
                               "or write the model folder again") from None
    if not isinstance(record, dict):
        raise RunSettingsError(f"{path}: expected a JSON object, got {type(record).__name__}")
    settings = {field: record[field] for field in FIELD_TYPES if field in record}
    for field, value in settings.items():
        if not isinstance(value, FIELD_TYPES[field]) or isinstance(value, bool):
            raise RunSettingsError(f"{path}: {field} = {value!r} has the wrong type; write the model folder again")
    if settings.get("format_prompt"):
        settings["format_prompt"] = str(_template_path(path, settings["format_prompt"]))
    return settings


def config_defaults(folder: str | Path) -> dict[str, Any]:
    """The folder's settings as dotted config keys: the defaults of a run, an evaluation or vLLM on it (below the
    user's config file and overrides)."""
    settings = read_run_settings(folder)
    defaults = {CONFIG_KEYS[field]: value for field, value in settings.items() if field in CONFIG_KEYS}
    if "format_prompt" in settings:
        defaults["data.format_prompt"] = settings["format_prompt"]
    return defaults


def _template_path(path: Path, name: str) -> Path:
    template = path.parent / name
    if Path(name).name != name or not template.is_file():
        raise RunSettingsError(f"{path}: format_prompt names {name!r}, which is not a file beside it; copy the "
                               "template there or write the model folder again")
    return template
