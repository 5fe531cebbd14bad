"""Loading: defaults -> `config=path.yaml` -> dotted overrides, derived fields, finalizing, YAML output."""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional, get_args, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from monet_models.run_settings import LATENT_CONFIG, RunSettingsError, config_defaults
from RL.config.checks import get_dotted, problems
from RL.config.schema import REPO_ROOT, ConfigError, RootConfig
from rewards.interface import resolve_function_spec
from common.secrets import redact as redact_secrets  # the one home of the secret rules

MODEL_PATH_KEY = "worker.actor.model.model_path"


# ---------------------------------------------------------------------------------------------------- loading
def load_config(argv: list[str], *, require_inputs: bool = True) -> RootConfig:
    """Build the config from `argv` (`config=path.yaml` and `dotted.key=value` items) and finalize it.

    Layers, each above the one before: the schema defaults, the settings the model folder carries (its
    latent_config.json, monet_models/run_settings.py), the config file, the command line.
    `require_inputs=False` skips the check for train_files/model_path (for printing the reference).
    """
    yaml_path, overrides = _split_argv(argv)
    schema = _schema()  # first: it refuses a bad LATENT_SIZE, which every dataclass default below would trip on
    yaml_layer, stated = _drop_derived(_load_yaml(yaml_path)) if yaml_path else (OmegaConf.create(), {})
    cli = _parse_dotlist(overrides)
    _refuse_derived(cli, "command line")
    model_path = _model_path(yaml_layer, cli)
    merged = _merge(schema, _model_folder_layer(model_path), f"{model_path}/{LATENT_CONFIG}")
    if yaml_path:
        merged = _merge(merged, yaml_layer, str(yaml_path))
        _check_stated_derived(merged, stated, str(yaml_path))
    merged = _merge(merged, cli, "command line")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _config_error(error, "config") from None
    return finalize(cfg, require_inputs=require_inputs)


def _schema():
    try:
        return OmegaConf.structured(RootConfig)
    except ValueError as error:  # an invalid LATENT_SIZE in the environment
        raise ConfigError(f"worker.rollout.latent_size: {error}") from None


def _split_argv(argv: list[str]) -> tuple[Optional[Path], list[str]]:
    yaml_path, overrides = None, []
    for item in argv:
        if "=" not in item:
            raise ConfigError(f"{item!r}: expected config=path.yaml or dotted.key=value")
        key, value = item.split("=", 1)
        if key == "config":
            yaml_path = Path(value)
        else:
            overrides.append(item)
    return yaml_path, overrides


def _model_path(*layers) -> str:
    """The model folder the layers name (a later layer wins, as in the merge); "" when none does."""
    for layer in reversed(layers):
        value = OmegaConf.select(layer, MODEL_PATH_KEY, default=None)
        if value:
            return str(value)
    return ""


def _model_folder_layer(model_path: str):
    """The settings the model folder carries, as a layer of defaults (empty for a folder without them or a hub id);
    so a merged checkpoint evaluates and trains on as its run did without that run's config file."""
    layer = OmegaConf.create()
    if not model_path:
        return layer
    try:
        defaults = config_defaults(Path(os.path.expanduser(model_path)))
    except RunSettingsError as error:
        raise ConfigError(f"{MODEL_PATH_KEY}: {error}") from None
    for key, value in defaults.items():
        OmegaConf.update(layer, key, value)
    return layer


def _load_yaml(path: Path):
    if not path.is_file():
        raise ConfigError(f"config: no such file {path}")
    try:
        return OmegaConf.load(path)
    except Exception as error:  # a YAML syntax error names the line
        raise ConfigError(f"config: cannot parse {path}: {error}") from None


def _parse_dotlist(overrides: list[str]):
    """`key=` (what bash leaves of `key=''`) means "" for plain fields and None for Optional ones; OmegaConf alone
    reads it as None, which a str field refuses and a path field (`data.val_files`) takes for no value at all."""
    overrides = [f"{item}''" if item.endswith("=") and not _declared_optional(item[:-1]) else item
                 for item in overrides]
    try:
        return OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as error:
        raise ConfigError(f"command line: cannot parse overrides {overrides}: {error}") from None


def _declared_optional(key: str) -> bool:
    """Whether the schema declares dotted `key` as Optional[...]; keys inside dict fields are not."""
    section: Any = RootConfig
    *parents, leaf = key.split(".")
    for name in parents:
        section = get_type_hints(section).get(name) if dataclasses.is_dataclass(section) else None
    hint = get_type_hints(section).get(leaf) if dataclasses.is_dataclass(section) else None
    return type(None) in get_args(hint)


def _merge(base, layer, source: str):
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as error:
        raise _config_error(error, source) from None


def _config_error(error: OmegaConfBaseException, source: str) -> ConfigError:
    """Rewrap an OmegaConf error so it leads with the dotted key, suggesting close keys for unknown ones."""
    key = getattr(error, "full_key", None) or "config"
    reason = str(error).split("\n")[0]
    if isinstance(error, ConfigKeyError):
        close = suggest_keys(key)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return ConfigError(f"{key}: unknown key (from {source}){hint}")
    if "ListConfig" in reason:
        reason += " (expected a list, e.g. [a,b])"
    return ConfigError(f"{key}: wrong type (from {source}): {reason}")


def suggest_keys(key: str, limit: int = 3) -> list[str]:
    """Known dotted keys close to `key`: same section first, then the same leaf name anywhere."""
    known = list(_dotted_keys(OmegaConf.to_container(_schema())))
    parent, _, leaf = key.rpartition(".")
    same_leaf = [k for k in known if k.rpartition(".")[2] == leaf]  # right name, wrong section
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    close = same_leaf + difflib.get_close_matches(key, siblings, n=limit, cutoff=0.6)
    leaves = sorted({k.rpartition(".")[2] for k in known})
    for name in difflib.get_close_matches(leaf, leaves, n=limit, cutoff=0.8):
        close += [k for k in known if k.rpartition(".")[2] == name]
    return list(dict.fromkeys(close))[:limit]


def _dotted_keys(tree: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(tree, dict):
        for name, value in tree.items():
            path = f"{prefix}{name}"
            yield path
            yield from _dotted_keys(value, path + ".")


def derived_keys(cls: type = RootConfig, prefix: str = "") -> dict[str, str]:
    """Dotted key of every derived (init=False) field -> the key it is derived from."""
    keys = {}
    for item in dataclasses.fields(cls):
        path = f"{prefix}{item.name}"
        if "derived_from" in item.metadata:
            keys[path] = item.metadata["derived_from"]
        elif item.default_factory is not dataclasses.MISSING:
            value = item.default_factory()
            if dataclasses.is_dataclass(value):
                keys.update(derived_keys(type(value), path + "."))
    return keys


def _drop_derived(layer) -> tuple[Any, dict[str, Any]]:
    """Take derived keys out of a YAML layer (a run's written config.yaml states them) to be checked later."""
    container = OmegaConf.to_container(layer)
    stated = {}
    for key in derived_keys():
        *parents, leaf = key.split(".")
        holder = container
        for part in parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and leaf in holder:
            stated[key] = holder.pop(leaf)
    return OmegaConf.create(container), stated


def _check_stated_derived(merged, stated: dict[str, Any], source: str) -> None:
    """Derived values a YAML states must be what its own settings derive (so a written config.yaml reloads, and a
    hand-written `worker.actor.kl_coef` is refused rather than silently ignored)."""
    if not stated:
        return
    try:
        cfg = derive(OmegaConf.to_object(merged))
    except OmegaConfBaseException as error:
        raise _config_error(error, source) from None
    sources = derived_keys()
    for key, value in stated.items():
        if get_dotted(cfg, key) != value:
            raise ConfigError(f"{key}: derived from {sources[key]} (= {get_dotted(cfg, key)!r}), but {source} sets "
                              f"{value!r}; set {sources[key]} instead")


def _refuse_derived(layer, source: str) -> None:
    sources = derived_keys()
    for key in _dotted_keys(OmegaConf.to_container(layer)):
        if key in sources:
            raise ConfigError(f"{key}: derived from {sources[key]} and cannot be set (from {source}); "
                              f"set {sources[key]} instead")


# ------------------------------------------------------------------------------------------------- finalizing
def finalize(cfg: RootConfig, *, require_inputs: bool = True) -> RootConfig:
    """Fill derived fields and make paths absolute (`derive`), then refuse impossible combinations."""
    derive(cfg)
    errors = list(problems(cfg, require_inputs))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return cfg


def derive(cfg: RootConfig) -> RootConfig:
    """The one place derived fields are filled, parent sections before children."""
    data, actor, rollout, ref = cfg.data, cfg.worker.actor, cfg.worker.rollout, cfg.worker.ref
    rollout.prompt_length = data.max_prompt_length
    rollout.response_length = data.max_response_length
    rollout.max_model_len = data.max_prompt_length + data.max_response_length
    actor.use_kl_loss = cfg.algorithm.use_kl_loss and not cfg.algorithm.disable_kl
    actor.kl_penalty = cfg.algorithm.kl_penalty
    actor.temperature = rollout.temperature
    if ref.monet_rl_sigma is None:
        ref.monet_rl_sigma = actor.monet_rl_sigma
    actor.ref_monet_rl_sigma = ref.monet_rl_sigma
    _absolutize_paths(cfg)
    cfg.trainer.run_dir = str(Path(cfg.trainer.save_dir) / cfg.trainer.experiment_name)
    return cfg


def _absolutize_paths(cfg: RootConfig) -> None:
    """Ray workers may start elsewhere: data, model and output paths become absolute here."""
    data = cfg.data
    data.train_files = _abs_files(data.train_files)
    data.val_files = _abs_files(data.val_files)
    data.image_dir = _abs(data.image_dir) if data.image_dir else ""
    data.format_prompt = _abs(data.format_prompt, repo_fallback=True) if data.format_prompt else ""
    for key in ("proposer_prompt", "solver_prompt"):
        setattr(cfg.self_evolution, key, _abs(getattr(cfg.self_evolution, key), repo_fallback=True))
    model = cfg.worker.actor.model
    model.model_path = _abs_if_local(model.model_path)
    cfg.trainer.save_dir = _abs(cfg.trainer.save_dir)
    cfg.sft.output_dir = _abs(cfg.sft.output_dir) if cfg.sft.output_dir else ""
    cfg.worker.reward.reward_function = resolve_function_spec(cfg.worker.reward.reward_function)


def _abs(path: str, repo_fallback: bool = False) -> str:
    """Absolute path; a relative path missing from the working directory may name a file bundled in the repo."""
    expanded = Path(os.path.expanduser(path))
    if not expanded.is_absolute() and repo_fallback and not expanded.exists() and (REPO_ROOT / expanded).exists():
        return str(REPO_ROOT / expanded)
    return str(expanded.resolve())


def _abs_if_local(path: Optional[str]) -> Optional[str]:
    """Hub ids (`Qwen/Qwen2.5-VL-7B-Instruct`) stay as they are; local paths become absolute."""
    if not path:
        return path
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith(".")
    if looks_like_hub_id and not Path(path).exists():
        return path
    return _abs(path)


def _abs_files(files: Any) -> Any:
    if isinstance(files, str):
        return _abs(files) if files else ""
    if isinstance(files, (list, tuple)):
        return [_abs(item) if isinstance(item, str) else item for item in files]
    return files


def total_training_steps(cfg: RootConfig, batches_per_epoch: int) -> int:
    """`trainer.max_steps`, or every batch of every epoch when it is null."""
    return cfg.trainer.max_steps or batches_per_epoch * cfg.trainer.total_epochs


# ------------------------------------------------------------------------------------------------------ output
def to_yaml(cfg: RootConfig, redact: bool = True, path: Optional[str | Path] = None) -> str:
    """The resolved config as YAML (derived fields included); secrets redacted; written to `path` if given."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    if redact:
        container = redact_secrets(container)
    text = OmegaConf.to_yaml(OmegaConf.create(container))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text
