"""A latent-aware Qwen2.5-VL sharded with FSDP2 over the worker group, and its log-likelihoods.

One class serves three uses: the trainable full model (VLPO), a frozen reference copy, and a frozen base carrying one
LoRA adapter per named policy (self-evolution's solver and proposer, or a LoRA actor). Which adapter computes is
chosen per call inside `use(...)`, so the reference of a LoRA policy (adapters disabled) costs no second copy.
Text positions use token log-probs at the rollout temperature; latent positions the Gaussian log-density of the
recorded latent around the policy's mean (docs/design.md).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from monet_models.run_settings import write_run_settings
from common.checkpoint_layout import torch_dtype
from monet_models.transformers import load_latent_model
from workers.actor.fsdp import full_tensor, shard_model
from workers.actor.lora import apply_lora, is_adapter_key
from workers.actor.model_inputs import model_inputs, position_scores, unwrapped


class ShardedModel:
    def __init__(self, model_path: str, actor_config, *, trainable: bool, adapters: list[str] = (), fsdp=None,
                 offload=None):
        """`adapters` non-empty: a frozen base with one LoRA adapter per name; `fsdp`/`offload` default to the
        actor's sections (the reference passes its own)."""
        self.config, self.model_path, self.adapters = actor_config, model_path, list(adapters)
        fsdp, offload = fsdp or actor_config.fsdp, offload or actor_config.offload
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        model, self.processor = load_latent_model(model_path, dtype=_load_dtype(actor_config, fsdp, trainable),
                                                  config_overrides=actor_config.model.override_config)
        if trainable and actor_config.model.enable_gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not trainable or self.adapters:
            model.requires_grad_(False)
        elif actor_config.model.freeze_vision_tower:
            model.model.visual.requires_grad_(False)
        if self.adapters:
            model = apply_lora(model, actor_config.model.lora, self.adapters)
        model.to(self.device)
        compute_dtype = torch_dtype(fsdp.torch_dtype)
        mixed = compute_dtype if model.dtype != compute_dtype else None
        self.module = shard_model(model, param_dtype=mixed, reshard_after_forward=fsdp.enable_full_shard,
                                  offload_params=offload.offload_params or offload.offload_optimizer,
                                  fsdp_size=fsdp.fsdp_size)

    # ---- which weights compute ---------------------------------------------------------------------------------
    @contextmanager
    def use(self, adapter: str | None):
        """Compute with `adapter` active; None is the base with every adapter disabled (the reference)."""
        if not self.adapters:
            yield
        elif adapter is None:
            with self.module.disable_adapter():
                yield
        else:
            # peft also switches requires_grad to the active adapter, so only its weights get gradients
            self.module.set_adapter(adapter)
            yield

    def trainable_parameters(self, adapter: str | None) -> list[torch.nn.Parameter]:
        if adapter is None:
            return [p for p in self.module.parameters() if p.requires_grad]
        return [p for name, p in self.module.named_parameters() if is_adapter_key(name, adapter)]

    # ---- log-probs -------------------------------------------------------------------------------------------
    def scores(self, micro, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R) log-likelihood of each response position of `micro` and the (latents, D) fp32 means of its
        latent steps in recorded order, with gradients when in train mode."""
        cfg = self.config
        values, means = position_scores(self.module, model_inputs(micro, self.device), cfg.temperature, sigma,
                                        cfg.latent_logprob_scale == "dim", cfg.padding_free)
        return values[:, -micro.tensors["responses"].shape[1]:], means

    @property
    def latent_pad_id(self) -> int:
        return unwrapped(self.module).latent_tokens.pad

    @torch.no_grad()
    def score(self, batch, sigma: float, adapter: str | None) -> torch.Tensor:
        """Log-probs of a whole batch (old or reference log-probs), in eval mode and micro-batches."""
        return self.score_with_means(batch, sigma, adapter)[0]

    @torch.no_grad()
    def score_with_means(self, batch, sigma: float, adapter: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`score`, and the means of each sample's latent steps, (B, M, D) zero-padded to the most latents M of a
        sample, kept beside the log-probs so the latent KL to the reference can be exact (algorithms.kl)."""
        self.module.eval()
        micro_size = self.config.micro_batch_size_per_device_for_experience
        log_probs, means = [], []
        with self.use(adapter):
            for micro in batch.split(micro_size):
                values, micro_means = self.scores(micro, sigma)
                log_probs.append(values.float().cpu())
                counts = (micro.tensors["responses"] == self.latent_pad_id).sum(-1).tolist()
                means += micro_means.cpu().split(counts)
        return torch.cat(log_probs, dim=0), torch.nn.utils.rnn.pad_sequence(means, batch_first=True)

    # ---- weights ---------------------------------------------------------------------------------------------
    def gather_weights(self, adapter: str | None = None) -> dict[str, torch.Tensor]:
        """Full (unsharded) weights on every rank, a collective: the whole model, or one adapter's tensors.

        Not `cpu_offload=True`: with it only rank 0 receives the values, and every colocated engine needs them.
        """
        if adapter is not None:
            return {name: full_tensor(p.detach()).clone() for name, p in self.module.named_parameters()
                    if is_adapter_key(name, adapter)}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))

    def sharded_state(self, adapter: str | None = None) -> dict:
        """This rank's shards for torch.distributed.checkpoint: the whole model, or one adapter's tensors."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.module)
        return state if adapter is None else {k: v for k, v in state.items() if is_adapter_key(k, adapter)}

    def load_sharded_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(strict=not self.adapters))

    def save_hf_files(self, folder: str, settings: dict, adapter: str | None = None) -> None:
        """config.json, processor, the adapter's adapter_config.json (for merging later) and how to run the model:
        the run's `settings` (`monet_models.run_settings.settings_from_config`) as latent_config.json and
        generation_config.json, which every folder merged from this one carries."""
        base = unwrapped(self.module)
        base.config.save_pretrained(folder)
        write_run_settings(folder, settings, self.processor.tokenizer, base.generation_config)
        self.processor.save_pretrained(folder)
        if adapter is not None:
            config = self.module.peft_config[adapter]
            config.base_model_name_or_path = self.model_path
            config.save_pretrained(folder)


def _load_dtype(actor_config, fsdp, trainable: bool) -> str:
    """Trained weights stay fp32 (bf16 compute through FSDP mixed precision) unless the optimizer is adamw_bf16."""
    if not trainable:
        return fsdp.torch_dtype
    return "bf16" if actor_config.optim.strategy == "adamw_bf16" else "fp32"
