"""The configuration tree: typed dataclass defaults -> `config=path.yaml` -> dotted CLI overrides (OmegaConf).

    cfg = load_config(["config=examples/config/vlpo_monet.yaml", "worker.rollout.n=4"])
    python -m RL.config --print [config=...] [overrides...]     # the resolved reference, secrets redacted

Key names follow EasyR1 and Monet's `vlpo_train.sh` so their users' scripts carry over. Every problem (unknown key,
wrong type, impossible combination) is refused here, before any worker starts, with the full dotted key in the message.
Fields declared with `init=False` are derived: they are filled in `finalize` (the only place) and cannot be set.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from monet_models.latent_tokens import default_latent_size
from RL.rewards.config import JudgeConfig, RewardConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration the system refuses to start with; the message names the dotted key(s)."""


def derived(default: Any, source: str) -> Any:
    """A field filled by `finalize` from the `source` key; users set the source key instead."""
    return field(default=default, init=False, metadata={"derived_from": source})


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    train_files: Any = ""  # a file, a folder (its top-level data files) or a list; json/jsonl/parquet/save_to_disk
    val_files: Any = ""  # same forms; "" = no validation set
    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"
    image_dir: str = ""  # relative image paths resolve here; "" = the folder of the data file itself
    max_prompt_length: int = 4096  # tokens after the chat template, image tokens included
    max_response_length: int = 4096
    rollout_batch_size: int = 64  # prompts per training step
    val_batch_size: int = 512  # prompts; -1 = the whole validation set in one batch
    format_prompt: str = "examples/format_prompt/monet_format.jinja"  # Jinja file with `content`; "" = none
    shuffle: bool = True
    seed: int = 1
    min_pixels: int = 262144
    max_pixels: int = 3136000
    filter_overlong_prompts: bool = True
    online_accum_size: int = 1024  # prompts per generation round of online difficulty sampling
    train_max_samples: int = -1  # -1 = all rows; otherwise the first N valid rows (none dropped beyond N)
    val_max_samples: int = -1
    dataloader_num_workers: int = 0  # worker processes that run the image processor while the step runs


# --------------------------------------------------------------------------------------------------------- actor
@dataclass
class LoraConfig:
    rank: int = 0  # 0 = full fine-tuning
    alpha: int = 64
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names
    exclude_modules: Optional[str] = r".*visual.*"  # regex of modules never adapted


@dataclass
class ModelConfig:
    model_path: str = ""  # a local Qwen2.5-VL folder (or a hub id already in the local cache)
    tokenizer_path: Optional[str] = None  # None = model_path
    override_config: dict[str, Any] = field(default_factory=dict)
    enable_gradient_checkpointing: bool = True
    freeze_vision_tower: bool = False
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    strategy: str = "adamw"  # adamw | adamw_bf16
    lr_warmup_steps: int = 0
    lr_scheduler_type: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr


@dataclass
class FSDPConfig:
    torch_dtype: str = "bf16"  # fp32 | bf16: parameter dtype of the trained model
    enable_full_shard: bool = True
    enable_rank0_init: bool = True
    fsdp_size: int = -1  # -1 = shard over all devices


@dataclass
class OffloadConfig:
    offload_params: bool = False
    offload_optimizer: bool = False


@dataclass
class ActorConfig:
    global_batch_size: int = 16  # prompts per optimizer step (workers multiply by rollout.n)
    micro_batch_size_per_device_for_update: int = 2  # samples
    micro_batch_size_per_device_for_experience: int = 8  # samples, for log-prob passes
    max_grad_norm: float = 1.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.3
    clip_ratio_dual: float = 3.0
    ppo_epochs: int = 1
    loss_avg_mode: str = "token"  # token | seq
    monet_rl_sigma: float = 10.0  # std of the latent Gaussian policy
    latent_logprob_scale: str = "none"  # none | dim (divide the latent log-density by the hidden size)
    padding_free: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    # derived from algorithm.* and worker.rollout.*
    disable_kl: bool = derived(False, "algorithm.disable_kl")
    use_kl_loss: bool = derived(True, "algorithm.use_kl_loss")
    kl_penalty: str = derived("low_var_kl", "algorithm.kl_penalty")
    kl_coef: float = derived(0.0, "algorithm.kl_coef")
    temperature: float = derived(1.0, "worker.rollout.temperature")
    latent_size: int = derived(0, "worker.rollout.latent_size")


# ------------------------------------------------------------------------------------------------------- rollout
@dataclass
class MonetConfig:
    latent_noise_std: float = 0.0  # exploration noise added to each recorded latent
    select_acc_threshold: float = 0.6  # online difficulty sampling keeps groups with accuracy in (0, threshold]


@dataclass
class RolloutConfig:
    name: str = "auto"  # native | vllm | auto (vllm where installed with CUDA, else native)
    n: int = 8
    temperature: float = 1.0
    top_p: float = 0.99
    top_k: int = -1
    seed: int = 1
    sampling_strategy: str = "monet"  # monet (latent blocks) | sample | greedy
    latent_size: int = field(default_factory=default_latent_size)  # K; default from LATENT_SIZE, else 10
    monet: MonetConfig = field(default_factory=MonetConfig)
    online_difficulty_sampling: bool = False
    dtype: str = "bf16"
    gpu_memory_utilization: float = 0.6
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 16384
    enable_chunked_prefill: bool = False
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    limit_images: int = 4  # max images per prompt for the engine; 0 = no limit
    repetition_penalty: float = 1.0
    disable_tqdm: bool = False
    val_override_config: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.1, "n": 1})
    # derived from data.*
    prompt_length: int = derived(0, "data.max_prompt_length")
    response_length: int = derived(0, "data.max_response_length")
    max_model_len: int = derived(0, "data.max_prompt_length + data.max_response_length")


# ------------------------------------------------------------------------------------------- ref, placement, worker
@dataclass
class RefConfig:
    monet_rl_sigma: Optional[float] = None  # None = worker.actor.monet_rl_sigma
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    offload: OffloadConfig = field(default_factory=lambda: OffloadConfig(offload_params=True))
    # derived from worker.actor.* and worker.rollout.*
    micro_batch_size_per_device_for_experience: int = derived(0, "worker.actor.micro_batch_size_per_device_for_experience")
    padding_free: bool = derived(True, "worker.actor.padding_free")
    latent_logprob_scale: str = derived("none", "worker.actor.latent_logprob_scale")
    temperature: float = derived(1.0, "worker.rollout.temperature")
    latent_size: int = derived(0, "worker.rollout.latent_size")


@dataclass
class PlacementConfig:
    colocate: bool = True  # actor, rollout and ref share one process per device


@dataclass
class WorkerConfig:
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rule_based_judge: JudgeConfig = field(default_factory=JudgeConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)


# ------------------------------------------------------------------------------------------ algorithm, trainer, sft
@dataclass
class AlgorithmConfig:
    adv_estimator: str = "grpo"  # grpo | rloo | reinforce_plus_plus
    disable_kl: bool = False  # true = no reference model, no KL at all
    use_kl_loss: bool = True  # KL as a loss term (true) or as a reward penalty (false)
    kl_penalty: str = "low_var_kl"  # kl | abs | mse | low_var_kl | full
    kl_coef: float = 1e-2
    kl_type: str = "fixed"  # fixed | adaptive
    kl_target: float = 0.1
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 1.0


@dataclass
class TrainerConfig:
    total_epochs: int = 1
    max_steps: Optional[int] = None  # None = total_epochs x batches per epoch
    project_name: str = "monet_rl"
    experiment_name: str = "vlpo"  # the run name: runs/<experiment_name>/
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl"])  # console | jsonl | wandb | tensorboard
    nnodes: int = 1
    n_gpus_per_node: int = 8  # devices (CPU: processes) per node
    max_try_make_batch: int = 20  # online difficulty sampling rounds before giving up; -1 = unlimited
    val_freq: int = 5  # -1 = never
    val_before_train: bool = True
    val_only: bool = False
    val_generations_to_log: int = 5
    save_freq: int = 10  # -1 = only at the end
    save_limit: int = 10  # checkpoints kept; -1 = all
    save_dir: str = "runs"
    resume: bool = True  # continue from the newest complete checkpoint of the run
    seed: int = 1
    # derived
    run_dir: str = derived("", "trainer.save_dir / trainer.experiment_name")


@dataclass
class SFTConfig:
    """Warm start for `python -m RL.sft` (teaches the answer format before RL)."""

    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    log_every: int = 10
    seed: int = 0
    train_files: Any = ""  # "" = data.train_files
    output_dir: str = ""  # "" = <run_dir>/sft_model


@dataclass
class RootConfig:
    data: DataConfig = field(default_factory=DataConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    @property
    def world_size(self) -> int:
        return self.trainer.nnodes * self.trainer.n_gpus_per_node


CHOICES: dict[str, tuple] = {
    "worker.actor.loss_avg_mode": ("token", "seq"),
    "worker.actor.latent_logprob_scale": ("none", "dim"),
    "worker.actor.optim.strategy": ("adamw", "adamw_bf16"),
    "worker.actor.optim.lr_scheduler_type": ("constant", "cosine"),
    "worker.actor.fsdp.torch_dtype": ("fp32", "bf16"),
    "worker.ref.fsdp.torch_dtype": ("fp32", "bf16"),
    "worker.rollout.name": ("native", "vllm", "auto"),
    "worker.rollout.sampling_strategy": ("monet", "sample", "greedy"),
    "worker.rollout.dtype": ("fp32", "bf16", "fp16"),
    "algorithm.adv_estimator": ("grpo", "rloo", "reinforce_plus_plus"),
    "algorithm.kl_penalty": ("kl", "abs", "mse", "low_var_kl", "full"),
    "algorithm.kl_type": ("fixed", "adaptive"),
}
LOGGERS = ("console", "jsonl", "wandb", "tensorboard")
VAL_OVERRIDABLE = ("n", "temperature", "top_p", "top_k", "seed", "sampling_strategy", "repetition_penalty")
# data column names end in "_key" but hold no secret
NOT_SECRET = frozenset({"prompt_key", "answer_key", "image_key"})
SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"})


# ---------------------------------------------------------------------------------------------------- loading
def load_config(argv: list[str], *, require_inputs: bool = True) -> RootConfig:
    """Build the config from `argv` (`config=path.yaml` and `dotted.key=value` items) and finalize it.

    `require_inputs=False` skips the check for train_files/model_path (for printing the reference).
    """
    yaml_path, overrides = _split_argv(argv)
    merged = _schema()
    if yaml_path:
        layer, stated = _drop_derived(_load_yaml(yaml_path))
        merged = _merge(merged, layer, str(yaml_path))
        _check_stated_derived(merged, stated, str(yaml_path))
    cli = _parse_dotlist(overrides)
    _refuse_derived(cli, "command line")
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


def _load_yaml(path: Path):
    if not path.is_file():
        raise ConfigError(f"config: no such file {path}")
    try:
        return OmegaConf.load(path)
    except Exception as error:  # a YAML syntax error names the line
        raise ConfigError(f"config: cannot parse {path}: {error}") from None


def _parse_dotlist(overrides: list[str]):
    try:
        return OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as error:
        raise ConfigError(f"command line: cannot parse overrides {overrides}: {error}") from None


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
        if _get(cfg, key) != value:
            raise ConfigError(f"{key}: derived from {sources[key]} (= {_get(cfg, key)!r}), but {source} sets "
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
    errors = list(_check(cfg, require_inputs))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return cfg


def derive(cfg: RootConfig) -> RootConfig:
    """The one place derived fields are filled, parent sections before children."""
    data, actor, rollout, ref = cfg.data, cfg.worker.actor, cfg.worker.rollout, cfg.worker.ref
    rollout.prompt_length = data.max_prompt_length
    rollout.response_length = data.max_response_length
    rollout.max_model_len = data.max_prompt_length + data.max_response_length
    actor.disable_kl = cfg.algorithm.disable_kl
    actor.use_kl_loss = cfg.algorithm.use_kl_loss and not cfg.algorithm.disable_kl
    actor.kl_penalty = cfg.algorithm.kl_penalty
    actor.kl_coef = cfg.algorithm.kl_coef
    actor.temperature = rollout.temperature
    actor.latent_size = rollout.latent_size
    if ref.monet_rl_sigma is None:
        ref.monet_rl_sigma = actor.monet_rl_sigma
    ref.micro_batch_size_per_device_for_experience = actor.micro_batch_size_per_device_for_experience
    ref.padding_free = actor.padding_free
    ref.latent_logprob_scale = actor.latent_logprob_scale
    ref.temperature = rollout.temperature
    ref.latent_size = rollout.latent_size
    if actor.model.tokenizer_path is None:
        actor.model.tokenizer_path = actor.model.model_path
    _absolutize_paths(cfg)
    cfg.trainer.run_dir = str(Path(cfg.trainer.save_dir) / cfg.trainer.experiment_name)
    return cfg


def _absolutize_paths(cfg: RootConfig) -> None:
    """Ray workers may start elsewhere: data, model and output paths become absolute here."""
    data = cfg.data
    data.train_files = _abs_files(data.train_files)
    data.val_files = _abs_files(data.val_files)
    cfg.sft.train_files = _abs_files(cfg.sft.train_files)
    data.image_dir = _abs(data.image_dir) if data.image_dir else ""
    data.format_prompt = _abs(data.format_prompt, repo_fallback=True) if data.format_prompt else ""
    model = cfg.worker.actor.model
    model.model_path = _abs_if_local(model.model_path)
    model.tokenizer_path = _abs_if_local(model.tokenizer_path)
    cfg.trainer.save_dir = _abs(cfg.trainer.save_dir)
    cfg.sft.output_dir = _abs(cfg.sft.output_dir) if cfg.sft.output_dir else ""
    reward = cfg.worker.reward
    path, sep, function = reward.reward_function.rpartition(":")
    if sep and path.endswith(".py"):
        reward.reward_function = f"{_abs(path, repo_fallback=True)}:{function}"


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


def _check(cfg: RootConfig, require_inputs: bool) -> Iterator[str]:
    """Every refused combination, as messages that lead with the dotted key(s)."""
    yield from _check_choices(cfg)
    yield from _check_data(cfg.data, require_inputs)
    yield from _check_actor(cfg)
    yield from _check_rollout(cfg)
    yield from _check_algorithm(cfg)
    yield from _check_trainer(cfg)
    if require_inputs and not cfg.worker.actor.model.model_path:
        yield "worker.actor.model.model_path: required (a Qwen2.5-VL model folder)"


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_choices(cfg: RootConfig) -> Iterator[str]:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            yield f"{key}: {value!r} is not one of {', '.join(allowed)}"
    for name in cfg.trainer.logger:
        if name not in LOGGERS:
            yield f"trainer.logger: {name!r} is not one of {', '.join(LOGGERS)}"


def _files_list(files: Any) -> Optional[list]:
    if isinstance(files, str):
        return [files] if files else []
    if isinstance(files, (list, tuple)) and all(isinstance(item, str) and item for item in files):
        return list(files)
    return None


def _check_data(data: DataConfig, require_inputs: bool) -> Iterator[str]:
    for key in ("train_files", "val_files"):
        files = _files_list(getattr(data, key))
        if files is None:
            yield f"data.{key}: expected a path or a list of paths, got {getattr(data, key)!r}"
        elif require_inputs and key == "train_files" and not files:
            yield "data.train_files: required (a data file, a folder or a list of them)"
    for key in ("max_prompt_length", "max_response_length", "rollout_batch_size", "online_accum_size",
                "min_pixels", "max_pixels"):
        if getattr(data, key) < 1:
            yield f"data.{key}: must be >= 1, got {getattr(data, key)}"
    if data.min_pixels > data.max_pixels:
        yield f"data.min_pixels, data.max_pixels: min_pixels ({data.min_pixels}) > max_pixels ({data.max_pixels})"
    for key in ("val_batch_size", "train_max_samples", "val_max_samples"):
        value = getattr(data, key)
        if value < 1 and value != -1:
            yield f"data.{key}: must be -1 (all) or >= 1, got {value}"
    if data.format_prompt and not Path(data.format_prompt).is_file():
        yield f"data.format_prompt: no such file {data.format_prompt}"
    if data.dataloader_num_workers < 0:
        yield f"data.dataloader_num_workers: must be >= 0, got {data.dataloader_num_workers}"


def _check_actor(cfg: RootConfig) -> Iterator[str]:
    actor, data, n = cfg.worker.actor, cfg.data, cfg.worker.rollout.n
    for key in ("global_batch_size", "micro_batch_size_per_device_for_update",
                "micro_batch_size_per_device_for_experience", "ppo_epochs"):
        if getattr(actor, key) < 1:
            yield f"worker.actor.{key}: must be >= 1, got {getattr(actor, key)}"
    if actor.global_batch_size >= 1 and data.rollout_batch_size % actor.global_batch_size:
        yield (f"data.rollout_batch_size, worker.actor.global_batch_size: rollout_batch_size "
               f"({data.rollout_batch_size}) must be a multiple of global_batch_size ({actor.global_batch_size})")
    if actor.global_batch_size >= 1 and n >= 1 and (actor.global_batch_size * n) % cfg.world_size:
        yield (f"worker.actor.global_batch_size, worker.rollout.n, trainer.n_gpus_per_node, trainer.nnodes: "
               f"global_batch_size x n ({actor.global_batch_size * n} samples) must split evenly over "
               f"{cfg.world_size} devices")
    for key in ("clip_ratio_low", "clip_ratio_high", "max_grad_norm"):
        if getattr(actor, key) < 0:
            yield f"worker.actor.{key}: must be >= 0, got {getattr(actor, key)}"
    if actor.clip_ratio_dual <= 1:
        yield f"worker.actor.clip_ratio_dual: the dual-clip constant must be > 1, got {actor.clip_ratio_dual}"
    for key, sigma in (("worker.actor.monet_rl_sigma", actor.monet_rl_sigma),
                       ("worker.ref.monet_rl_sigma", cfg.worker.ref.monet_rl_sigma)):
        if not sigma > 0:
            yield f"{key}: the latent policy std must be > 0, got {sigma}"
    yield from _check_optim(actor)


def _check_optim(actor: ActorConfig) -> Iterator[str]:
    optim, lora = actor.optim, actor.model.lora
    if optim.lr <= 0:
        yield f"worker.actor.optim.lr: must be > 0, got {optim.lr}"
    if len(optim.betas) != 2 or not all(0 <= beta < 1 for beta in optim.betas):
        yield f"worker.actor.optim.betas: expected two values in [0, 1), got {list(optim.betas)}"
    if not 0 <= optim.min_lr_ratio <= 1:
        yield f"worker.actor.optim.min_lr_ratio: must be in [0, 1], got {optim.min_lr_ratio}"
    if optim.lr_warmup_steps < 0:
        yield f"worker.actor.optim.lr_warmup_steps: must be >= 0, got {optim.lr_warmup_steps}"
    if lora.rank < 0 or (lora.rank > 0 and lora.alpha <= 0):
        yield "worker.actor.model.lora.rank, worker.actor.model.lora.alpha: rank >= 0 and alpha > 0 required"


def _check_rollout(cfg: RootConfig) -> Iterator[str]:
    rollout = cfg.worker.rollout
    if rollout.n < 1:
        yield f"worker.rollout.n: must be >= 1, got {rollout.n}"
    if rollout.latent_size < 1:
        yield f"worker.rollout.latent_size: must be >= 1, got {rollout.latent_size}"
    if rollout.temperature <= 0 and rollout.sampling_strategy != "greedy":
        yield (f"worker.rollout.temperature: must be > 0 for sampling_strategy={rollout.sampling_strategy} "
               f"(use worker.rollout.sampling_strategy=greedy)")
    if not 0 < rollout.top_p <= 1:
        yield f"worker.rollout.top_p: must be in (0, 1], got {rollout.top_p}"
    if rollout.monet.latent_noise_std < 0:
        yield f"worker.rollout.monet.latent_noise_std: must be >= 0, got {rollout.monet.latent_noise_std}"
    if not 0 < rollout.gpu_memory_utilization <= 1:
        yield f"worker.rollout.gpu_memory_utilization: must be in (0, 1], got {rollout.gpu_memory_utilization}"
    if rollout.tensor_parallel_size < 1 or cfg.trainer.n_gpus_per_node % rollout.tensor_parallel_size:
        yield (f"worker.rollout.tensor_parallel_size, trainer.n_gpus_per_node: tensor_parallel_size "
               f"({rollout.tensor_parallel_size}) must divide n_gpus_per_node ({cfg.trainer.n_gpus_per_node})")
    unknown = sorted(set(rollout.val_override_config) - set(VAL_OVERRIDABLE))
    if unknown:
        yield f"worker.rollout.val_override_config: unknown keys {unknown}; allowed: {', '.join(VAL_OVERRIDABLE)}"
    if rollout.online_difficulty_sampling:
        threshold = rollout.monet.select_acc_threshold
        if not 0 < threshold <= 1:
            yield f"worker.rollout.monet.select_acc_threshold: must be in (0, 1], got {threshold}"
        if rollout.n < 2:
            yield ("worker.rollout.online_difficulty_sampling, worker.rollout.n: accuracy in (0, threshold] needs "
                   f"at least 2 samples per prompt, got n={rollout.n}")


def _check_algorithm(cfg: RootConfig) -> Iterator[str]:
    algorithm, n = cfg.algorithm, cfg.worker.rollout.n
    if algorithm.adv_estimator in ("grpo", "rloo") and n < 2:
        yield (f"algorithm.adv_estimator, worker.rollout.n: {algorithm.adv_estimator} compares samples within a "
               f"prompt group and needs worker.rollout.n >= 2, got {n}")
    if algorithm.disable_kl and algorithm.use_kl_loss:
        yield ("algorithm.disable_kl, algorithm.use_kl_loss: disable_kl removes the reference model; "
               "set algorithm.use_kl_loss=false too")
    if algorithm.kl_coef < 0:
        yield f"algorithm.kl_coef: must be >= 0, got {algorithm.kl_coef}"
    if algorithm.kl_type == "adaptive" and (algorithm.kl_target <= 0 or algorithm.kl_horizon <= 0):
        yield "algorithm.kl_target, algorithm.kl_horizon: the adaptive KL controller needs both > 0"
    for key in ("gamma", "lam"):
        if not 0 <= getattr(algorithm, key) <= 1:
            yield f"algorithm.{key}: must be in [0, 1], got {getattr(algorithm, key)}"


def _check_trainer(cfg: RootConfig) -> Iterator[str]:
    trainer = cfg.trainer
    for key in ("total_epochs", "nnodes", "n_gpus_per_node"):
        if getattr(trainer, key) < 1:
            yield f"trainer.{key}: must be >= 1, got {getattr(trainer, key)}"
    if trainer.max_steps is not None and trainer.max_steps < 1:
        yield f"trainer.max_steps: must be >= 1 or null, got {trainer.max_steps}"
    for key in ("val_freq", "save_freq", "save_limit", "max_try_make_batch"):
        value = getattr(trainer, key)
        if value < 1 and value != -1:
            yield f"trainer.{key}: must be -1 or >= 1, got {value}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", trainer.experiment_name or ""):
        yield (f"trainer.experiment_name: {trainer.experiment_name!r} must be a folder name "
               "(letters, digits, . _ + = -)")


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


def is_secret_key(name: str) -> bool:
    """Keys such as api_key, hf_token, client_secret, password (whole words, so tokenizer_path is no secret)."""
    lowered = str(name).lower()
    if lowered in NOT_SECRET:
        return False
    words = set(re.split(r"[^a-z0-9]+", lowered))
    return bool(words & SECRET_WORDS) or any(word in lowered for word in ("secret", "password", "apikey"))


def redact_secrets(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: ("***" if is_secret_key(key) and value not in (None, "") and not isinstance(value, dict)
                      else redact_secrets(value)) for key, value in tree.items()}
    if isinstance(tree, list):
        return [redact_secrets(item) for item in tree]
    return tree


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] != "--print":
        print("usage: python -m RL.config --print [config=path.yaml] [dotted.key=value ...]")
        return
    try:
        cfg = load_config(argv[1:], require_inputs=False)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    print(to_yaml(cfg, redact=True), end="")


if __name__ == "__main__":
    main()
