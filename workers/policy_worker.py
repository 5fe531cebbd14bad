"""The per-device worker that hosts the policy roles: actor, rollout and reference.

By default one process per device holds all three (EasyR1's hybrid engine): the rollout engine is refreshed
from the actor in-process each step, and with LoRA the reference is the actor with its adapters disabled, so
no second trainable copy exists. `worker.placement.colocate=false` runs the rollout role in its own group.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from monet_models.transformers import load_latent_model
from workers.actor.fsdp_actor import FSDPPolicy
from workers.actor.lora import lora_scaling, merge_lora_state_dict
from workers.group import DistributedWorker, timed_work
from workers.rollout.base import SamplingParams


class PolicyWorker(DistributedWorker):
    def init_roles(self, config, roles: list[str], total_steps: int) -> None:
        self.config = config
        actor_cfg = config.worker.actor
        path = actor_cfg.model.model_path
        self.actor = FSDPPolicy(actor_cfg, path, trainable=True, total_steps=total_steps) if "actor" in roles else None
        self.ref = None
        if "ref" in roles and self._needs_ref_copy():
            ref_cfg = config.worker.ref
            self.ref = FSDPPolicy(actor_cfg, path, trainable=False, fsdp=ref_cfg.fsdp, offload=ref_cfg.offload)
        self.engine = None
        if "rollout" in roles:
            self._build_engine(path)

    def _needs_ref_copy(self) -> bool:
        actor_cfg = self.config.worker.actor
        return actor_cfg.use_kl_loss and actor_cfg.model.lora.rank == 0

    def _build_engine(self, path: str) -> None:
        from workers.rollout.native import NativeRolloutEngine

        model, processor = load_latent_model(path, dtype=self.config.worker.rollout.dtype)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.engine_model = model.to(device).eval()
        self.engine = NativeRolloutEngine(self.engine_model, processor.tokenizer)

    # ---- rollout ---------------------------------------------------------------------------------------------
    @timed_work
    def sync_rollout_weights(self) -> None:
        """Copy the actor's current weights into the rollout engine (collective over the actor group)."""
        state = self._rollout_state()
        if self.engine is not None:
            self.engine_model.load_state_dict(state)

    @timed_work
    def export_weights(self) -> dict | None:
        state = self._rollout_state()
        return state if self.rank == 0 else None

    def _rollout_state(self) -> dict:
        state = self.actor.full_state_dict()
        lora = self.config.worker.actor.model.lora
        return merge_lora_state_dict(state, lora_scaling(lora)) if lora.rank > 0 else state

    @timed_work
    def load_rollout_weights(self, state: dict) -> None:
        self.engine_model.load_state_dict(state)

    @timed_work
    def generate(self, prompts: list, params: SamplingParams) -> list:
        if params.seed is not None:
            params = dataclasses.replace(params, seed=params.seed + 7919 * self.rank)
        with torch.inference_mode():
            return self.engine.generate(prompts, params)

    # ---- log-probs and update --------------------------------------------------------------------------------
    @timed_work
    def compute_log_probs(self, batch) -> torch.Tensor:
        return self.actor.compute_log_probs(batch, self.config.worker.actor.monet_rl_sigma)

    @timed_work
    def compute_ref_log_probs(self, batch) -> torch.Tensor:
        sigma = self.config.worker.ref.monet_rl_sigma
        if self.ref is not None:
            return self.ref.compute_log_probs(batch, sigma)
        return self.actor.compute_log_probs(batch, sigma, disable_adapter=True)

    @timed_work
    def update_actor(self, batch, mini_batch_size: int, kl_coef: float) -> dict:
        return self.actor.update(batch, mini_batch_size, kl_coef)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self, folder: str, role: str = "actor") -> None:
        role_dir = Path(folder) / role
        self.actor.save(str(role_dir))
        if self.rank == 0:
            self.actor.save_hf_files(str(role_dir / "huggingface"))

    def load_checkpoint(self, folder: str, role: str = "actor") -> None:
        self.actor.load(str(Path(folder) / role))
