"""Every refused combination, as messages that lead with the dotted key(s)."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from pathlib import Path
from typing import Any, Iterator, Optional

from RL.config.schema import (CHOICES, LOGGERS, OPTIONAL_LOGGERS, VAL_OVERRIDABLE, ActorConfig, DataConfig,
                              RootConfig, TokenBudgets)

def problems(cfg: RootConfig, require_inputs: bool) -> Iterator[str]:
    """Every refused combination, as messages that lead with the dotted key(s)."""
    yield from _check_finite(cfg)
    yield from _check_choices(cfg)
    yield from _check_data(cfg.data, require_inputs)
    yield from _check_actor(cfg)
    yield from _check_rollout(cfg)
    yield from _check_algorithm(cfg)
    yield from _check_trainer(cfg)
    yield from _check_self_evolution(cfg)
    yield from _check_sft(cfg)
    yield from _check_eval(cfg)
    if require_inputs and not cfg.worker.actor.model.model_path:
        yield "worker.actor.model.model_path: required (a Qwen2.5-VL model folder)"


def get_dotted(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_finite(value: Any, key: str = "") -> Iterator[str]:
    """NaN and inf in any float, at any depth: NaN passes every `x <= 0` test, inf every upper bound, and both
    only fail much later, far from the key. Derived fields are skipped (their source key is reported)."""
    if dataclasses.is_dataclass(value):
        for item in dataclasses.fields(value):
            if "derived_from" not in item.metadata:
                yield from _check_finite(getattr(value, item.name), f"{key}.{item.name}".lstrip("."))
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from _check_finite(item, f"{key}.{name}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _check_finite(item, f"{key}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        yield f"{key}: must be a finite number, got {value}"


def _check_choices(cfg: RootConfig) -> Iterator[str]:
    for key, allowed in CHOICES.items():
        value = get_dotted(cfg, key)
        if value not in allowed:
            yield f"{key}: {value!r} is not one of {', '.join(allowed)}"
    for name in cfg.trainer.logger:
        if name not in LOGGERS:
            yield f"trainer.logger: {name!r} is not one of {', '.join(LOGGERS)}"
        elif name in OPTIONAL_LOGGERS and importlib.util.find_spec(OPTIONAL_LOGGERS[name]) is None:
            yield f"trainer.logger: {name} is not installed here; pip install -e '.[{name}]'"


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
            yield "data.train_files: required; name a .json, .jsonl or .parquet file, a folder of them or a list"
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
    fsdp_size = actor.fsdp.fsdp_size
    if fsdp_size == 0 or fsdp_size < -1 or (fsdp_size > 0 and cfg.world_size % fsdp_size):
        yield (f"worker.actor.fsdp.fsdp_size: -1 (shard over all devices) or a divisor of the {cfg.world_size} "
               f"devices, got {fsdp_size}")
    for key in ("clip_ratio_low", "clip_ratio_high", "max_grad_norm"):
        if getattr(actor, key) < 0:
            yield f"worker.actor.{key}: must be >= 0, got {getattr(actor, key)}"
    if actor.clip_ratio_dual <= 1:
        yield f"worker.actor.clip_ratio_dual: the dual-clip constant must be > 1, got {actor.clip_ratio_dual}"
    for key, sigma in (("worker.actor.monet_rl_sigma", actor.monet_rl_sigma),
                       ("worker.ref.monet_rl_sigma", cfg.worker.ref.monet_rl_sigma)):
        if not sigma > 0:
            yield f"{key}: the latent policy std must be > 0, got {sigma}"
    yield from _check_micro_batching(actor, data)
    yield from _check_optim(actor)


def _check_micro_batching(actor: ActorConfig, data: DataConfig) -> Iterator[str]:
    if actor.logprob_chunk_size < 0:
        yield f"worker.actor.logprob_chunk_size: must be >= 0 (0 = unchunked), got {actor.logprob_chunk_size}"
    yield from _check_token_budgets("worker.actor", actor, data)


def _check_token_budgets(prefix: str, section: TokenBudgets, data: DataConfig) -> Iterator[str]:
    """With `<prefix>.dynamic_batching`, every token budget must hold the longest sequence (a sample never splits)."""
    if not section.dynamic_batching:
        return
    longest = data.max_prompt_length + data.max_response_length
    for update in (True, False):
        if section.token_budget(update) < longest:
            yield (f"{prefix}.{section.budget_key(update)}: a micro-batch must hold the longest sequence, "
                   f"data.max_prompt_length + data.max_response_length = {longest} tokens, "
                   f"got {section.token_budget(update)}")


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
    if rollout.sync_bucket_mb < 0:
        yield f"worker.rollout.sync_bucket_mb: must be >= 0 (0: one parameter at a time), got {rollout.sync_bucket_mb}"
    if rollout.cpu_kvcache_space_gb < 0:
        yield ("worker.rollout.cpu_kvcache_space_gb: must be >= 0 (0: what the batch needs), "
               f"got {rollout.cpu_kvcache_space_gb}")
    if rollout.tensor_parallel_size < 1 or cfg.trainer.n_gpus_per_node % rollout.tensor_parallel_size:
        yield (f"worker.rollout.tensor_parallel_size, trainer.n_gpus_per_node: tensor_parallel_size "
               f"({rollout.tensor_parallel_size}) must divide n_gpus_per_node ({cfg.trainer.n_gpus_per_node})")
    if rollout.tensor_parallel_size > 1 and rollout.name == "native":
        yield (f"worker.rollout.tensor_parallel_size, worker.rollout.name: tensor parallelism "
               f"({rollout.tensor_parallel_size}) is vLLM's; the native engine holds the whole model on every rank. "
               "Set worker.rollout.name=vllm or tensor_parallel_size=1")
    unknown = sorted(set(rollout.val_override_config) - set(VAL_OVERRIDABLE))
    if unknown:
        yield f"worker.rollout.val_override_config: unknown keys {unknown}; allowed: {', '.join(VAL_OVERRIDABLE)}"
    yield from _check_val_override(rollout)
    if rollout.online_difficulty_sampling:
        threshold = rollout.monet.select_acc_threshold
        if not 0 < threshold <= 1:
            yield f"worker.rollout.monet.select_acc_threshold: must be in (0, 1], got {threshold}"
        if rollout.n < 2:
            yield ("worker.rollout.online_difficulty_sampling, worker.rollout.n: accuracy in (0, threshold] needs "
                   f"at least 2 samples per prompt, got n={rollout.n}")
        if cfg.data.online_accum_size < cfg.data.rollout_batch_size:
            yield ("data.online_accum_size, data.rollout_batch_size: each generation round must offer at least a "
                   f"batch of prompts ({cfg.data.online_accum_size} < {cfg.data.rollout_batch_size})")


VAL_OVERRIDE_TYPES = {"n": ("an integer", int), "top_k": ("an integer", int), "seed": ("an integer", int),
                      "temperature": ("a number", (int, float)), "top_p": ("a number", (int, float)),
                      "repetition_penalty": ("a number", (int, float)), "sampling_strategy": ("a string", str)}


def _check_val_override(rollout) -> Iterator[str]:
    """The values val_override_config sets meet the rollout's own rules here, not at the first validation."""
    override = {k: v for k, v in rollout.val_override_config.items() if k in VAL_OVERRIDABLE}
    key = "worker.rollout.val_override_config"
    for name, value in override.items():
        kind, types = VAL_OVERRIDE_TYPES[name]
        if isinstance(value, bool) or not isinstance(value, types):
            yield f"{key}.{name}: expected {kind}, got {value!r}"
            return
    strategy = override.get("sampling_strategy", rollout.sampling_strategy)
    strategies = CHOICES["worker.rollout.sampling_strategy"]
    if strategy not in strategies:
        yield f"{key}.sampling_strategy: {strategy!r} is not one of {', '.join(strategies)}"
    elif override.keys() & {"temperature", "sampling_strategy"}:
        temperature = override.get("temperature", rollout.temperature)
        if temperature < 0 or (temperature == 0 and strategy == "sample"):
            yield (f"{key}.temperature: {temperature} with sampling_strategy={strategy} in validation; need > 0 "
                   "(or >= 0 with monet; greedy decoding is sampling_strategy: greedy)")
    if override.get("n", 1) < 1:
        yield f"{key}.n: must be >= 1, got {override['n']}"
    if not 0 < override.get("top_p", 1) <= 1:
        yield f"{key}.top_p: must be in (0, 1], got {override['top_p']}"
    if override.get("repetition_penalty", 1) <= 0:
        yield f"{key}.repetition_penalty: must be > 0, got {override['repetition_penalty']}"


def _check_algorithm(cfg: RootConfig) -> Iterator[str]:
    algorithm, n = cfg.algorithm, cfg.worker.rollout.n
    if algorithm.adv_estimator in GROUP_ESTIMATORS and n < 2:
        yield (f"algorithm.adv_estimator, worker.rollout.n: {algorithm.adv_estimator} compares samples within a "
               f"prompt group and needs worker.rollout.n >= 2, got {n}")
    yield from _check_zero_advantages(cfg)
    if algorithm.disable_kl and algorithm.use_kl_loss:
        yield ("algorithm.disable_kl, algorithm.use_kl_loss: disable_kl removes the reference model; "
               "set algorithm.use_kl_loss=false too")
    if algorithm.kl_coef < 0:
        yield f"algorithm.kl_coef: must be >= 0, got {algorithm.kl_coef}"
    if algorithm.kl_type == "adaptive" and (algorithm.kl_target <= 0 or algorithm.kl_horizon <= 0):
        yield "algorithm.kl_target, algorithm.kl_horizon: the adaptive KL controller needs both > 0"
    if not 0 <= algorithm.gamma <= 1:
        yield f"algorithm.gamma: must be in [0, 1], got {algorithm.gamma}"
    if not 0 <= algorithm.lam <= 1:
        yield f"algorithm.lam: must be in [0, 1], got {algorithm.lam}"
    yield from _check_online_filtering(cfg)
    yield from _check_policy_loss(cfg)
    yield from _check_critic(cfg)


GROUP_ESTIMATORS = ("grpo", "rloo", "grpo_passk")  # compare the samples of one prompt


def _check_online_filtering(cfg: RootConfig) -> Iterator[str]:
    algorithm = cfg.algorithm
    if not algorithm.online_filtering:
        return
    if cfg.worker.rollout.online_difficulty_sampling:
        yield ("algorithm.online_filtering, worker.rollout.online_difficulty_sampling: two filters of the same loop "
               "(EasyR1's on a reward key, Monet's on accuracy); choose one")
    if not algorithm.filter_low < algorithm.filter_high:
        yield (f"algorithm.filter_low, algorithm.filter_high: the kept interval ({algorithm.filter_low}, "
               f"{algorithm.filter_high}) is empty")
    if not algorithm.filter_key:
        yield "algorithm.filter_key: name a reward component (or overall)"


def _check_policy_loss(cfg: RootConfig) -> Iterator[str]:
    actor, rollout = cfg.worker.actor, cfg.worker.rollout
    if actor.loss_type in ("gspo", "gspo_token") and rollout.sampling_strategy == "monet" and \
            actor.latent_logprob_scale != "dim":
        yield (f"worker.actor.loss_type, worker.actor.latent_logprob_scale: {actor.loss_type} averages the log-ratio "
               "over a sequence's positions, and a latent step's log-ratio is a sum over the hidden size's D "
               "dimensions (hundreds of nats for a small move of its mean), so the latent steps alone would set every "
               "sequence's ratio; set latent_logprob_scale=dim (per-dimension densities) or use a token-level "
               "loss_type")
    for key in ("tau_positive", "tau_negative"):
        if not getattr(actor, key) > 0:
            yield f"worker.actor.{key}: the sapo gate temperature must be > 0, got {getattr(actor, key)}"
    if actor.entropy_coeff < 0:
        yield f"worker.actor.entropy_coeff: must be >= 0 (a bonus), got {actor.entropy_coeff}"


def _check_critic(cfg: RootConfig) -> Iterator[str]:
    """worker.critic.* and trainer.critic_warmup: read only with algorithm.adv_estimator=gae."""
    critic, gae = cfg.worker.critic, cfg.algorithm.adv_estimator == "gae"
    if cfg.trainer.critic_warmup < 0:
        yield f"trainer.critic_warmup: must be >= 0, got {cfg.trainer.critic_warmup}"
    elif cfg.trainer.critic_warmup and not gae:
        yield ("trainer.critic_warmup, algorithm.adv_estimator: critic warm-up trains the critic alone first; "
               f"{cfg.algorithm.adv_estimator} has no critic (use adv_estimator=gae)")
    if not gae:
        return
    for key in ("global_batch_size", "micro_batch_size_per_device_for_update",
                "micro_batch_size_per_device_for_experience", "ppo_epochs"):
        if getattr(critic, key) < 1:
            yield f"worker.critic.{key}: must be >= 1, got {getattr(critic, key)}"
    if critic.global_batch_size >= 1 and cfg.data.rollout_batch_size % critic.global_batch_size:
        yield (f"data.rollout_batch_size, worker.critic.global_batch_size: rollout_batch_size "
               f"({cfg.data.rollout_batch_size}) must be a multiple of global_batch_size ({critic.global_batch_size})")
    if critic.global_batch_size >= 1 and (critic.global_batch_size * cfg.worker.rollout.n) % cfg.world_size:
        yield (f"worker.critic.global_batch_size, worker.rollout.n: global_batch_size x n "
               f"({critic.global_batch_size * cfg.worker.rollout.n} samples) must split evenly over {cfg.world_size} "
               "devices")
    for key in ("cliprange_value", "max_grad_norm"):
        if getattr(critic, key) < 0:
            yield f"worker.critic.{key}: must be >= 0, got {getattr(critic, key)}"
    if critic.optim.lr <= 0:
        yield f"worker.critic.optim.lr: must be > 0, got {critic.optim.lr}"
    if len(critic.optim.betas) != 2 or not all(0 <= beta < 1 for beta in critic.optim.betas):
        yield f"worker.critic.optim.betas: expected two values in [0, 1), got {list(critic.optim.betas)}"
    yield from _check_token_budgets("worker.critic", critic, cfg.data)
    yield from _check_critic_width(cfg)


def _check_critic_width(cfg: RootConfig) -> Iterator[str]:
    """A critic from another folder must take the actor's latents as input embeddings: the same hidden size."""
    path, actor_path = cfg.worker.critic.model.model_path, cfg.worker.actor.model.model_path
    if not path or path == actor_path:
        return
    widths = [_hidden_size(p) for p in (path, actor_path)]
    if None not in widths and widths[0] != widths[1]:
        yield (f"worker.critic.model.model_path: its hidden size {widths[0]} differs from the actor's {widths[1]}; "
               "the critic reads the actor's latent vectors as input embeddings, so it needs the same width")


def _hidden_size(folder: str) -> Optional[int]:
    import json

    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    return (data.get("text_config") or {}).get("hidden_size") or data.get("hidden_size")


def _check_zero_advantages(cfg: RootConfig) -> Iterator[str]:
    """Settings under which an advantage is 0 for every sample, so a role would train on nothing and say nothing
    (groups of one sample, groups whose samples are all the same, a batch that whitens to 0)."""
    algorithm, rollout, se = cfg.algorithm, cfg.worker.rollout, cfg.self_evolution
    group_based = algorithm.adv_estimator in GROUP_ESTIMATORS
    if rollout.sampling_strategy == "greedy" and rollout.n >= 2 and (group_based or se.advantage == "grpo"):
        keys = "algorithm.adv_estimator" if group_based else "self_evolution.advantage"
        yield (f"worker.rollout.sampling_strategy, {keys}: greedy decoding makes the {rollout.n} samples of a "
               "prompt identical, so every group's advantage is 0; use sampling_strategy=monet or sample")
    if rollout.sampling_strategy == "greedy" and algorithm.adv_estimator == "remax":
        yield ("worker.rollout.sampling_strategy, algorithm.adv_estimator: remax subtracts the reward of the greedy "
               "answer, and greedy rollouts are that answer, so every advantage is 0; use sampling_strategy=monet or "
               "sample")
    if se.advantage == "grpo" and se.questions_per_image < 2:
        yield ("self_evolution.advantage, self_evolution.questions_per_image: grpo compares the proposer's questions "
               f"about one image, so with questions_per_image={se.questions_per_image} its advantage is always 0; "
               "set questions_per_image >= 2 or advantage=ema_baseline")
    if se.advantage == "grpo" and rollout.n < 2:
        yield ("self_evolution.advantage, worker.rollout.n: grpo compares the solver's answers to one question, so "
               f"with n={rollout.n} its advantage is always 0; set worker.rollout.n >= 2 or advantage=ema_baseline")
    in_reward_kl = not algorithm.disable_kl and not algorithm.use_kl_loss
    if algorithm.adv_estimator == "reinforce_plus_plus" and algorithm.gamma == 1 and not in_reward_kl and \
            cfg.data.rollout_batch_size * rollout.n == 1:
        yield ("algorithm.adv_estimator, data.rollout_batch_size, worker.rollout.n: reinforce_plus_plus whitens the "
               "returns over the batch, and a batch of one sample (gamma=1) whitens to 0; use more samples per step")
    threshold = rollout.monet.select_acc_threshold
    if rollout.online_difficulty_sampling and rollout.n >= 2 and 0 < threshold < 1 / rollout.n:
        yield (f"worker.rollout.monet.select_acc_threshold, worker.rollout.n: a group's accuracy is a multiple of "
               f"1/{rollout.n}, so none lies in (0, {threshold}] and no batch can be made; raise the threshold to "
               f">= {1 / rollout.n:.3g}")


def _check_trainer(cfg: RootConfig) -> Iterator[str]:
    trainer = cfg.trainer
    for key in ("total_epochs", "nnodes", "n_gpus_per_node"):
        if getattr(trainer, key) < 1:
            yield f"trainer.{key}: must be >= 1, got {getattr(trainer, key)}"
    if trainer.placement_timeout_s <= 0:
        yield f"trainer.placement_timeout_s: must be > 0 seconds, got {trainer.placement_timeout_s}"
    if not (trainer.device_memory_gb > 0 or trainer.device_memory_gb in (0, -1)):
        yield (f"trainer.device_memory_gb: GiB per device (> 0), 0 = detect, -1 = no memory check; got "
               f"{trainer.device_memory_gb}")
    if trainer.dist_timeout_s <= 0:
        yield f"trainer.dist_timeout_s: must be > 0 seconds, got {trainer.dist_timeout_s}"
    if trainer.max_restarts < 0:
        yield f"trainer.max_restarts: must be >= 0, got {trainer.max_restarts}"
    if trainer.max_steps is not None and trainer.max_steps < 1:
        yield f"trainer.max_steps: must be >= 1 or null, got {trainer.max_steps}"
    for key in ("val_freq", "save_freq", "save_limit", "max_try_make_batch"):
        value = getattr(trainer, key)
        if value < 1 and value != -1:
            yield f"trainer.{key}: must be -1 or >= 1, got {value}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", trainer.experiment_name or ""):
        yield (f"trainer.experiment_name: {trainer.experiment_name!r} must be a folder name "
               "(letters, digits, . _ + = -)")


def _check_self_evolution(cfg: RootConfig) -> Iterator[str]:
    se = cfg.self_evolution
    for key in ("proposer_prompt", "solver_prompt"):
        if not Path(getattr(se, key)).is_file():
            yield f"self_evolution.{key}: no such file {getattr(se, key)}"
    for key in ("questions_per_image", "proposer_max_new_tokens", "proposer_update_freq"):
        if getattr(se, key) < 1:
            yield f"self_evolution.{key}: must be >= 1, got {getattr(se, key)}"
    if not 0 <= se.warmup_frac < 1:
        yield f"self_evolution.warmup_frac: must be in [0, 1), got {se.warmup_frac}"
    if not 0 <= se.ema_momentum < 1:
        yield f"self_evolution.ema_momentum: must be in [0, 1), got {se.ema_momentum}"
    for key in ("proposer_temperature", "target_words", "entropy_sigma", "kl_target", "step_temperature"):
        if not getattr(se, key) > 0:
            yield f"self_evolution.{key}: must be > 0, got {getattr(se, key)}"
    for key in ("kl_coef", "kl_rate", "len_penalty", "step_position_decay", "step_density_gamma", "soft_gamma"):
        if getattr(se, key) < 0:
            yield f"self_evolution.{key}: must be >= 0, got {getattr(se, key)}"
    for key in ("step_weight_start", "step_weight_end"):
        if not 0 <= getattr(se, key) <= 1:
            yield f"self_evolution.{key}: must be in [0, 1], got {getattr(se, key)}"


def _check_sft(cfg: RootConfig) -> Iterator[str]:
    sft = cfg.sft
    for key in ("epochs", "batch_size", "micro_batch_size", "max_length"):
        if getattr(sft, key) < 1:
            yield f"sft.{key}: must be >= 1, got {getattr(sft, key)}"
    for key in ("steps", "latent_size"):
        if getattr(sft, key) is not None and getattr(sft, key) < 1:
            yield f"sft.{key}: must be >= 1 or null, got {getattr(sft, key)}"
    if sft.lr is not None and sft.lr <= 0:
        yield f"sft.lr: must be > 0 or null, got {sft.lr}"
    for key in ("warmup_steps", "weight_decay", "max_grad_norm"):
        if getattr(sft, key) is not None and getattr(sft, key) < 0:
            yield f"sft.{key}: must be >= 0 or null, got {getattr(sft, key)}"
    for key in ("ce_weight", "observation_weight", "align_weight"):
        if getattr(sft, key) < 0:
            yield f"sft.{key}: must be >= 0, got {getattr(sft, key)}"
    if sft.batch_size >= 1 and sft.batch_size % cfg.world_size:
        yield (f"sft.batch_size, trainer.n_gpus_per_node, trainer.nnodes: {sft.batch_size} rows must split evenly "
               f"over {cfg.world_size} devices")
    layers, lowest = sft.align_layers, 0 if sft.stage == "monet3" else 1  # monet3's layer 0: the latents
    if layers not in ("all", "last") and not (isinstance(layers, (list, tuple)) and layers and
                                              all(isinstance(x, int) and x >= lowest for x in layers)):
        yield f"sft.align_layers: all, last or a list of layers >= {lowest} ({sft.stage}), got {layers!r}"
    if sft.stage == "mirage1" and not _frozen_tower(cfg):
        yield ("sft.stage, sft.freeze_vision_tower: mirage1's targets are the helper image through the vision tower, "
               "which must stay frozen; set sft.freeze_vision_tower=true")


def _frozen_tower(cfg: RootConfig) -> bool:
    frozen = cfg.sft.freeze_vision_tower
    return cfg.worker.actor.model.freeze_vision_tower if frozen is None else frozen


EVAL_CHOICES = {"method": ("direct", "dmlr", "rmm"), "strategy": ("monet", "greedy"),
                "dmlr_init": ("model", "embedding"), "dmlr_sigma_scale": ("rms", "absolute"),
                "rmm_memory_scope": ("per_item", "dataset")}
ABLATIONS = ("zero", "shuffle", "noise", "text")


def _check_eval(cfg: RootConfig) -> Iterator[str]:
    ev = cfg.eval
    for key, allowed in EVAL_CHOICES.items():
        if getattr(ev, key) not in allowed:
            yield f"eval.{key}: {getattr(ev, key)!r} is not one of {', '.join(allowed)}"
    yield from _check_eval_passes(cfg)
    for key in ("batch_size", "dmlr_tokens", "dmlr_steps", "dmlr_pairs", "dmlr_top_k", "dmlr_inject_interval",
                "rmm_attempts", "rmm_critic_max_new_tokens", "rmm_memory_max_new_tokens"):
        if getattr(ev, key) < 1:
            yield f"eval.{key}: must be >= 1, got {getattr(ev, key)}"
    for key in ("max_new_tokens", "dmlr_initial_patches", "dmlr_patch_increment", "dmlr_inject_start",
                "dmlr_reward_threshold", "rmm_memory_max_entries"):
        if getattr(ev, key) < 0:
            yield f"eval.{key}: must be >= 0, got {getattr(ev, key)}"
    for key in ("dmlr_lr", "dmlr_sigma"):
        if not getattr(ev, key) > 0:
            yield f"eval.{key}: must be > 0, got {getattr(ev, key)}"
    if not 0 < ev.dmlr_sigma_decay <= 1:
        yield f"eval.dmlr_sigma_decay: must be in (0, 1], got {ev.dmlr_sigma_decay}"
    if ev.dmlr_max_patches < max(ev.dmlr_initial_patches, 1):
        yield (f"eval.dmlr_max_patches: must be >= 1 and >= eval.dmlr_initial_patches ({ev.dmlr_initial_patches}), "
               f"got {ev.dmlr_max_patches}")
    if ev.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", ev.name):
        yield f"eval.name: {ev.name!r} must be a folder name (letters, digits, . _ + = -)"
    for key in ("rmm_feedback_model", "rmm_memory_model"):
        spec = getattr(ev, key)
        if ev.method == "rmm" and spec != "self" and not (spec.startswith("api:") and spec[4:]) and \
                not Path(spec).is_dir():
            yield f"eval.{key}: {spec!r} is not self, api:<model name> or a model folder"


def _check_eval_passes(cfg: RootConfig) -> Iterator[str]:
    """Ablations and DMLR replace latents inside the engine: only the native engine implements that."""
    ev = cfg.eval
    ablations = [name for name in ev.ablate.split(",") if name]
    unknown = [name for name in ablations if name not in ABLATIONS]
    if unknown or len(set(ablations)) != len(ablations):
        yield f"eval.ablate: {ev.ablate!r} must list distinct values of {', '.join(ABLATIONS)}, comma-separated"
    if ablations and (ev.method != "direct" or ev.strategy != "monet"):
        yield (f"eval.ablate, eval.method, eval.strategy: ablations perturb the latents of the direct pass with "
               f"latent blocks; need method=direct and strategy=monet (got {ev.method}, {ev.strategy})")
    if ev.endpoint and (ev.method != "direct" or ablations not in ([], ["text"])):
        yield (f"eval.endpoint: an endpoint answers the direct pass (and ablate=text) only; got method={ev.method}, "
               f"ablate={ev.ablate!r}")
    if ev.endpoint and not re.match(r"https?://", ev.endpoint):
        yield f"eval.endpoint: {ev.endpoint!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)"
    if ev.endpoint_model and not ev.endpoint:
        yield "eval.endpoint_model: names a model of eval.endpoint, which is not set"
    needs_native = (ablations and ablations != ["text"]) or ev.method == "dmlr"
    if needs_native and cfg.worker.rollout.name == "vllm":
        what = "eval.method: DMLR optimises" if ev.method == "dmlr" else "eval.ablate: the ablations replace"
        yield (f"worker.rollout.name, {what} the latents the model sees, which only the native engine "
               "implements; set worker.rollout.name=native")
