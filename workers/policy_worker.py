"""The per-device worker that hosts named policies and their roles: actor (update), rollout and reference.

One process per device holds everything by default (EasyR1's hybrid engine). The policies are either one full model
(`actor`, VLPO) or LoRA adapters on one frozen base (`solver` and `proposer` for self-evolution, or a LoRA `actor`);
every method names the policy it acts on. The reference is a frozen copy for a full model, and the base with the
adapters disabled for LoRA. The rollout engine holds its own unsharded copy (base + adapters with LoRA), refreshed
from the actor each step; `worker.placement.colocate=false` runs it in its own group that receives weights via Ray.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from monet_models.transformers import load_latent_model
from tools.seeding import derive_seed
from workers.actor.lora import apply_lora
from workers.actor.policy import Policy
from workers.actor.sharded_model import ShardedModel
from workers.actor.updates import ppo_update
from workers.group import DistributedWorker, timed_work
from workers.rollout.base import SamplingParams

PEFT_PREFIX = "base_model.model."


class PolicyWorker(DistributedWorker):
    def init_roles(self, config, roles: list[str], policy_names: list[str], total_steps: int) -> None:
        self.config = config
        actor_cfg = config.worker.actor
        path = actor_cfg.model.model_path
        self.adapters = list(policy_names) if actor_cfg.model.lora.rank > 0 else []
        self.model = self.ref_model = self.engine = self.engine_peft = None
        self.policies: dict[str, Policy] = {}
        if "actor" in roles:
            self.model = ShardedModel(path, actor_cfg, trainable=True, adapters=self.adapters)
            self.policies = {name: Policy.build(name, self.model, name if self.adapters else None, actor_cfg.optim,
                                                total_steps) for name in policy_names}
        if "ref" in roles and not self.adapters and not config.algorithm.disable_kl:
            ref_cfg = config.worker.ref
            self.ref_model = ShardedModel(path, actor_cfg, trainable=False, fsdp=ref_cfg.fsdp, offload=ref_cfg.offload)
        if "rollout" in roles:
            self._build_engine(path)

    def _build_engine(self, path: str) -> None:
        from workers.rollout.native import NativeRolloutEngine

        model, processor = load_latent_model(path, dtype=self.config.worker.rollout.dtype)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # With LoRA the engine holds the base once and every adapter on it: no merged copy per policy.
        self.engine_peft = apply_lora(model, self.config.worker.actor.model.lora, self.adapters) if self.adapters \
            else None
        self.engine_model = (self.engine_peft.get_base_model() if self.adapters else model).to(device).eval()
        self.engine = NativeRolloutEngine(self.engine_model, processor.tokenizer)

    # ---- rollout ---------------------------------------------------------------------------------------------
    @timed_work
    def generate(self, prompts: list, params: SamplingParams, policy: str) -> list:
        if params.seed is not None:  # every rank draws its own stream
            params = dataclasses.replace(params, seed=derive_seed(params.seed, "rank", self.rank))
        if self.engine_peft is not None:
            self.engine_peft.set_adapter(policy)
        with torch.inference_mode():
            return self.engine.generate(prompts, params)

    @timed_work
    def sync_rollout_weights(self) -> None:
        """Copy every policy's current weights into the colocated engine (a collective over the actor group)."""
        weights = self._rollout_weights()
        if self.engine is not None:
            self.load_rollout_weights(weights)

    @timed_work
    def export_weights(self) -> dict | None:
        """The weights a separate rollout pool loads (rank 0 returns them; a collective)."""
        weights = self._rollout_weights()
        return weights if self.rank == 0 else None

    def _rollout_weights(self) -> dict:
        if not self.adapters:
            return self.model.gather_weights()
        return {name: tensor for adapter in self.adapters for name, tensor in self.model.gather_weights(adapter).items()}

    @timed_work
    def load_rollout_weights(self, weights: dict) -> None:
        if not self.adapters:
            self.engine_model.load_state_dict(weights)
            return
        params = dict(self.engine_model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name.removeprefix(PEFT_PREFIX)].copy_(tensor)

    # ---- log-probs and updates -------------------------------------------------------------------------------
    @timed_work
    def compute_log_probs(self, batch, policy: str) -> torch.Tensor:
        return self.model.score(batch, self.config.worker.actor.monet_rl_sigma, self.policies[policy].adapter)

    @timed_work
    def compute_ref_log_probs(self, batch) -> torch.Tensor:
        sigma = self.config.worker.ref.monet_rl_sigma
        if self.ref_model is not None:
            return self.ref_model.score(batch, sigma, None)
        return self.model.score(batch, sigma, None)  # the base with every adapter disabled

    @timed_work
    def update_policy(self, batch, policy: str, mini_batch_size: int, kl_coef: float) -> dict:
        return ppo_update(self.policies[policy], batch, self.config.worker.actor, mini_batch_size, kl_coef)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self, folder: str) -> None:
        """Every policy into `folder/<policy>/` (shards, optimizer, Hugging Face files)."""
        for name, policy in self.policies.items():
            policy_dir = Path(folder) / name
            policy.save(str(policy_dir))
            if self.rank == 0:
                self.model.save_hf_files(str(policy_dir / "huggingface"), policy.adapter)

    def load_checkpoint(self, folder: str) -> None:
        for name, policy in self.policies.items():
            policy.load(str(Path(folder) / name))
