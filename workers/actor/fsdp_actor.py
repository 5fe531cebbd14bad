"""The policy under FSDP2: log-probs of rollouts and the PPO/VLPO update with the latent Gaussian terms.

Text positions use token log-probs at the rollout temperature; latent positions use the Gaussian log-density of
the recorded latent around the policy's mean (DESIGN.md). Both enter the same clipped loss and KL, so GRPO
advantages reach the latent steps as well as the text.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch
import torch.distributed as dist

from RL.algorithms import aggregate_loss, compute_kl, compute_policy_loss
from monet_models.transformers import DTYPES, load_latent_model
from workers.actor.lora import apply_lora
from workers.actor.fsdp import all_reduce_sum, full_tensor, shard_model
from workers.actor.model_inputs import model_inputs, position_log_probs, unwrapped


LOSS_MODES = {"token": "token-mean", "seq": "seq-mean-token-mean"}


def lr_lambda(optim_config, total_steps: int):
    warmup = optim_config.lr_warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if optim_config.lr_scheduler_type != "cosine" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        floor = optim_config.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class FSDPPolicy:
    """One rank's share of a policy (trainable actor or frozen reference)."""

    def __init__(self, actor_config, model_path: str, trainable: bool, total_steps: int = 1, fsdp=None, offload=None):
        """`fsdp`/`offload` default to the actor's sections; the reference passes its own."""
        self.config = actor_config
        fsdp, offload = fsdp or actor_config.fsdp, offload or actor_config.offload
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        compute_dtype = DTYPES[fsdp.torch_dtype]
        # Trained weights stay fp32 (bf16 compute through FSDP mixed precision) unless the optimizer is adamw_bf16.
        bf16_master = trainable and actor_config.optim.strategy == "adamw_bf16"
        load_dtype = "fp32" if trainable and not bf16_master else ("bf16" if bf16_master else fsdp.torch_dtype)
        model, self.processor = load_latent_model(model_path, dtype=load_dtype)
        if trainable and actor_config.model.enable_gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if trainable and actor_config.model.freeze_vision_tower:
            model.model.visual.requires_grad_(False)
        if trainable and actor_config.model.lora.rank > 0:
            model = apply_lora(model, actor_config.model.lora)
        if not trainable:
            model.requires_grad_(False)
        model.to(self.device)
        mixed = compute_dtype if model.dtype != compute_dtype else None
        self.module = shard_model(model, param_dtype=mixed, reshard_after_forward=fsdp.enable_full_shard,
                                  offload_params=offload.offload_params)
        self.optimizer = self.scheduler = None
        if trainable:
            params = [p for p in self.module.parameters() if p.requires_grad]
            optim = actor_config.optim
            self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                                               weight_decay=optim.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim, total_steps))

    # ---- log-probs -------------------------------------------------------------------------------------------
    def _response_log_probs(self, micro, sigma: float) -> torch.Tensor:
        inputs = model_inputs(micro, self.device)
        values = position_log_probs(self.module, inputs, self.config.temperature, sigma,
                                    self.config.latent_logprob_scale == "dim", self.config.padding_free)
        response_len = micro.tensors["responses"].shape[1]
        return values[:, -response_len:]

    @torch.no_grad()
    def compute_log_probs(self, batch, sigma: float, disable_adapter: bool = False) -> torch.Tensor:
        """(B, R) log-likelihood of each response position; `disable_adapter` gives the LoRA base (reference)."""
        self.module.eval()
        micro_size = self.config.micro_batch_size_per_device_for_experience
        with self.module.disable_adapter() if disable_adapter else contextlib.nullcontext():
            outputs = [self._response_log_probs(micro, sigma).float().cpu() for micro in batch.split(micro_size)]
        return torch.cat(outputs, dim=0)

    # ---- update ----------------------------------------------------------------------------------------------
    def update(self, batch, mini_batch_size: int, kl_coef: float) -> dict:
        """PPO epochs over mini-batches (one optimizer step each) of micro-batches (gradient accumulation).

        `kl_coef` comes from the driver's KL controller (fixed or adaptive), not from the config.
        """
        self.module.train()
        metrics = defaultdict(list)
        for _ in range(self.config.ppo_epochs):
            for mini in batch.split(mini_batch_size):
                self._optimizer_step(mini, metrics, kl_coef)
        self.scheduler.step()
        summary = {key: float(sum(values) / len(values)) for key, values in metrics.items()}
        summary["actor/lr"] = self.scheduler.get_last_lr()[0]
        return summary

    def _optimizer_step(self, mini, metrics, kl_coef: float) -> None:
        cfg = self.config
        world = dist.get_world_size()
        global_tokens = float(all_reduce_sum(mini.tensors["response_mask"].sum()))
        mode = LOSS_MODES[cfg.loss_avg_mode]
        sums = defaultdict(float)  # this rank's share of global token means; summed over ranks below
        for micro in mini.split(cfg.micro_batch_size_per_device_for_update):
            log_probs = self._response_log_probs(micro, cfg.monet_rl_sigma)
            mask = micro.tensors["response_mask"].to(log_probs.device).float()
            old = micro.tensors["old_log_probs"].to(log_probs.device)
            advantages = micro.tensors["advantages"].to(log_probs.device)
            pg_tokens, pg_metrics = compute_policy_loss(
                log_probs, old, advantages, mask, cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_dual)
            loss_tokens = pg_tokens
            pg_loss = aggregate_loss(pg_tokens, mask, mode, global_tokens)
            if cfg.use_kl_loss and "ref_log_probs" in micro.tensors.keys():
                kl_tokens = compute_kl(log_probs, micro.tensors["ref_log_probs"].to(log_probs.device), cfg.kl_penalty)
                loss_tokens = loss_tokens + kl_coef * kl_tokens
                sums["actor/kl_loss"] += float(aggregate_loss(kl_tokens.detach(), mask, mode, global_tokens))
            # FSDP averages gradients over ranks; scaling by the world size turns that into the global token mean.
            loss = aggregate_loss(loss_tokens, mask, mode, global_tokens) * world
            loss.backward()
            sums["actor/pg_loss"] += float(pg_loss.detach())
            for key, value in pg_metrics.items():
                metrics[f"actor/{key}"].append(float(value))
        for key, value in sums.items():
            metrics[key].append(float(all_reduce_sum(value)))
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(
            [p for p in self.module.parameters() if p.requires_grad], cfg.max_grad_norm))
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:
            metrics["actor/skipped_steps"].append(1.0)
        self.optimizer.zero_grad(set_to_none=True)
        metrics["actor/grad_norm"].append(float(grad_norm))

    # ---- weights and checkpoints -----------------------------------------------------------------------------
    def full_state_dict(self) -> dict:
        """Full (unsharded) weights gathered on every rank; a collective call.

        Not `cpu_offload=True`: with it only rank 0 receives the values, and every colocated engine needs them.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))

    def save(self, folder: str) -> None:
        """Sharded model and optimizer state with torch.distributed.checkpoint (loads at any world size)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        dcp.save(get_model_state_dict(self.module), checkpoint_id=f"{folder}/model")
        if self.optimizer is not None:
            state = {"optimizer": get_optimizer_state_dict(self.module, self.optimizer),
                     "scheduler": self.scheduler.state_dict()}
            dcp.save(state, checkpoint_id=f"{folder}/optim")

    def load(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        model_state = get_model_state_dict(self.module)
        dcp.load(model_state, checkpoint_id=f"{folder}/model")
        set_model_state_dict(self.module, model_state)
        if self.optimizer is not None:
            state = {"optimizer": get_optimizer_state_dict(self.module, self.optimizer),
                     "scheduler": self.scheduler.state_dict()}
            dcp.load(state, checkpoint_id=f"{folder}/optim")
            set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])

    def save_hf_files(self, folder: str) -> None:
        """config.json, generation config, processor (and adapter_config.json with LoRA) for merging later."""
        base = unwrapped(self.module)
        base.config.save_pretrained(folder)
        base.generation_config.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        if hasattr(self.module, "peft_config"):
            self.module.peft_config["default"].save_pretrained(folder)
