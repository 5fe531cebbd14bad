"""The per-device worker that hosts named policies and their roles: actor (update), rollout and reference.

One process per device holds everything by default (EasyR1's hybrid engine). The policies are either one full model
(`actor`, VLPO) or LoRA adapters on one frozen base (`solver` and `proposer` for self-evolution, or a LoRA `actor`);
every method names the policy it acts on. The reference is a frozen copy for a full model, and the base with the
adapters disabled for LoRA. The rollout engine holds its own unsharded copy (base + adapters with LoRA); the trainer
wraps each generation phase in `begin_rollout` / `end_rollout`, which wake the engine, stream the actor's weights into
it when they changed since the last sync, and put it back to sleep. `worker.placement.colocate=false` runs the engine
in its own group, which receives the weights via Ray (`export_weights`) and never sleeps (no actor shares its device).
With `algorithm.adv_estimator=gae` a fourth role, the critic (`workers/critic.py`), is a value model sharded beside
them with its own optimizer and checkpoint folder.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from common.checkpoint_layout import hf_files_dir, role_dir, torch_dtype
from monet_models.run_settings import settings_from_config
from monet_models.transformers import load_latent_model
from common.seeding import derive_seed
from workers.actor.lora import apply_lora, lora_config
from workers.actor.policy import Policy
from workers.actor.sharded_model import ShardedModel
from workers.actor.sft_losses import save_latents, sft_update, stage2_latents
from workers.actor.updates import latent_rows, ppo_update, reference_kl
from workers.critic import ROLE as CRITIC, build_critic, update_critic
from workers.group import DistributedWorker, timed_work
from workers.rollout.base import SamplingParams
from workers.rollout.engines import use_vllm


class PolicyWorker(DistributedWorker):
    def init_roles(self, config, roles: list[str], policy_names: list[str], total_steps: int) -> None:
        self.config = config
        # Fresh LoRA matrices are random: the same seed on every rank and in the engine gives one initial policy.
        torch.manual_seed(derive_seed(config.trainer.seed, "init"))
        actor_cfg = config.worker.actor
        path = actor_cfg.model.model_path
        self.adapters = list(policy_names) if actor_cfg.model.lora.rank > 0 else []
        self.model = self.ref_model = self.engine = self.critic = None
        self.policies: dict[str, Policy] = {}
        self._kept: dict[str, dict[str, torch.Tensor]] = {}  # log-probs per step key, until the update
        # The actor's weights change (update, checkpoint load) bump the version; the engine syncs when it lags.
        self.actor_version, self._engine_version = 0, None
        if "actor" in roles:
            self.model = ShardedModel(path, actor_cfg, trainable=True, adapters=self.adapters)
            self.policies = {name: Policy.build(name, self.model, name if self.adapters else None, actor_cfg.optim,
                                                total_steps) for name in policy_names}
        if "ref" in roles and not self.adapters and not config.algorithm.disable_kl:
            ref_cfg = config.worker.ref
            self.ref_model = ShardedModel(path, actor_cfg, trainable=False, fsdp=ref_cfg.fsdp, offload=ref_cfg.offload)
        if CRITIC in roles:
            self.critic = build_critic(config, total_steps)
        if "rollout" in roles:
            self._build_engine(path)
            # Asleep between generation phases only where training state shares the device; a rollout-only worker
            # (separate pool, evaluation) keeps it awake.
            self._engine_sleeps = "actor" in roles
            if self._engine_sleeps:
                self.engine.sleep()

    def _build_engine(self, path: str) -> None:
        rollout, lora = self.config.worker.rollout, self.config.worker.actor.model.lora
        torch.manual_seed(derive_seed(self.config.trainer.seed, "init"))  # the actor's initial adapters, exactly
        if use_vllm(rollout.name):
            from workers.rollout.vllm_engine import VLLMRolloutEngine

            seed = derive_seed(rollout.seed, "engine", self.rank)
            self.engine = VLLMRolloutEngine.from_config(path, rollout, seed, lora if self.adapters else None,
                                                        dict(self.config.worker.actor.model.override_config))
            return
        from workers.rollout.native import NativeRolloutEngine

        overrides = self.config.worker.actor.model.override_config
        model, processor = load_latent_model(path, dtype=rollout.dtype, config_overrides=overrides)
        if self.adapters:  # the base once, with every adapter on it: no merged copy per policy
            model = apply_lora(model, lora, self.adapters).get_base_model()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.engine = NativeRolloutEngine(model.to(device).eval(), processor.tokenizer)

    # ---- rollout ---------------------------------------------------------------------------------------------
    @timed_work
    def generate(self, prompts: list, params: SamplingParams, policy: str) -> list:
        if params.seed is not None:  # every rank draws its own stream
            params = dataclasses.replace(params, seed=derive_seed(params.seed, "rank", self.rank))
        with torch.inference_mode():
            return self.engine.generate(prompts, params, lora=policy if self.adapters else None)

    # ---- the engine's generation phases -----------------------------------------------------------------------
    @timed_work
    def begin_rollout(self, weights: dict | None = None) -> float:
        """Ready the engine for a generation phase (EasyR1's order): free cached memory → wake its weights → bring
        them up to date → wake its KV cache. The weights come from this worker's actor when it changed since the last
        sync (a collective over the actor group: every rank calls this), or as `weights` (`export_weights` of the
        actor group, for a separate rollout pool). Returns the seconds the sync took (0 when nothing changed)."""
        free_cached_memory()
        self.engine.wake_up(["weights"])
        seconds, start = 0.0, time.perf_counter()
        if weights is not None:
            self._load_exported(weights)
            seconds = time.perf_counter() - start
        elif self.model is not None and self._engine_version != self.actor_version:
            self._sync_from_actor()
            seconds = time.perf_counter() - start
        self.engine.wake_up(["kv_cache"])
        return seconds

    @timed_work
    def end_rollout(self) -> None:
        """The phase is over: the engine gives its memory back (where it shares the device with training)."""
        if self._engine_sleeps:
            self.engine.sleep()
        free_cached_memory()

    def weights_version(self) -> int:
        """How many times the actor's weights changed since this worker started (the driver compares it with what
        a separate rollout pool last received)."""
        return self.actor_version

    def _actor_changed(self) -> None:
        self.actor_version += 1

    def _sync_from_actor(self) -> None:
        """Stream the full model (or each adapter's tensors) from the shards into the engine, one parameter or bucket
        at a time, cast to the engine's dtype; no file, and never a second full copy on the device."""
        if self.adapters:
            for name in self.adapters:
                self.engine.update_adapter(name, owned_copies(self._stream(name)), self._adapter_config())
        else:
            stream = self._stream(None)
            try:
                self.engine.update_weights(stream)
            finally:
                for _ in stream:  # the gathers are collectives: finish them even if the engine stopped early
                    pass
        self._engine_version = self.actor_version

    def _stream(self, adapter: str | None):
        rollout = self.config.worker.rollout
        return self.model.stream_weights(adapter, dtype=torch_dtype(rollout.dtype),
                                         bucket_bytes=int(rollout.sync_bucket_mb * 2 ** 20))

    @timed_work
    def export_weights(self) -> dict | None:
        """The actor's weights for a separate rollout pool, in host memory on rank 0 ({name: tensor}, or {adapter:
        {name: tensor}} with LoRA; None on the other ranks): a collective. The pool lives on other devices, so the
        whole model crosses Ray once per sync as one object in rank 0's store, which every pool rank reads."""
        if not self.adapters:
            return self._collect(self._stream(None))
        exported = {name: self._collect(self._stream(name)) for name in self.adapters}
        return exported if self.rank == 0 else None

    def _collect(self, stream) -> dict | None:
        if self.rank == 0:
            return owned_copies(stream)
        for _ in stream:
            pass
        return None

    def _load_exported(self, weights: dict) -> None:
        if not self.adapters:
            self.engine.update_weights(weights)
            return
        for name, tensors in weights.items():
            self.engine.update_adapter(name, tensors, self._adapter_config())

    def _adapter_config(self):
        config = lora_config(self.config.worker.actor.model.lora)
        config.base_model_name_or_path = self.config.worker.actor.model.model_path
        return config

    # ---- log-probs and updates -------------------------------------------------------------------------------
    # The log-probs stay on the worker under the step's `key` until the update reads them: the driver needs none of
    # them, only the rollout/actor agreement (and, for a KL in the reward, the per-token KL).
    @timed_work
    def compute_log_probs(self, batch, policy: str, key: str) -> dict:
        """Old log-probs of this rank's shard under `policy`; returns the rollout/actor disagreement on text and the
        sum of the policy's next-token entropy over the text decisions (`actor/entropy`)."""
        old, means, entropy = self.model.score_with_means(batch, self.config.worker.actor.monet_rl_sigma,
                                                          self.policies[policy].adapter, entropy=True)
        self._kept.setdefault(key, {}).update(old_log_probs=old, old_latent_means=means)
        text = batch.tensors["response_mask"].bool() & (batch.tensors["rollout_log_probs"] != 0)
        diff = (old - batch.tensors["rollout_log_probs"]).abs()[text]
        decisions = batch.tensors["response_mask"].bool() & (batch.tensors["responses"] != self.model.latent_pad_id)
        return {"logprob_diff_sum": float(diff.sum()), "text_tokens": int(text.sum()),
                "entropy_sum": float(entropy[decisions].sum()), "entropy_tokens": int(decisions.sum())}

    def forget(self, key: str) -> None:
        """Drop what was kept for step `key` when its actor update is skipped (critic warm-up)."""
        self._kept.pop(key, None)

    @timed_work
    def compute_ref_log_probs(self, batch, key: str, reward_kl: str | None = None) -> torch.Tensor | None:
        """Reference log-probs (a frozen copy, or the base with every adapter disabled). With `reward_kl` (a KL
        estimator name) returns the per-token KL of the old log-probs to them, for a KL penalty in the reward."""
        sigma = self.config.worker.ref.monet_rl_sigma
        ref, ref_means = (self.ref_model or self.model).score_with_means(batch, sigma, None)
        kept = self._kept.setdefault(key, {})
        kept.update(ref_log_probs=ref, ref_latent_means=ref_means)
        old_means = kept.pop("old_latent_means")  # only the KL in the reward reads them; the update has its own
        if reward_kl is None:
            return None
        latent_mask = batch.tensors["responses"] == self.model.latent_pad_id
        kl = reference_kl(reward_kl, self.config.worker.actor, latent_mask, kept["old_log_probs"],
                          latent_rows(old_means, latent_mask), ref, latent_rows(ref_means, latent_mask))
        return kl * batch.tensors["response_mask"].float()

    @timed_work
    def update_policy(self, batch, policy: str, key: str, advantages: torch.Tensor, mini_batch_size: int,
                      kl_coef: float) -> dict:
        batch.tensors.update({**self._kept.pop(key), "advantages": advantages})  # a fresh copy from the store
        self._actor_changed()
        return ppo_update(self.policies[policy], batch, self.config.worker.actor, mini_batch_size, kl_coef)

    # ---- the critic (workers/critic.py) -----------------------------------------------------------------------
    @timed_work
    def compute_values(self, batch) -> torch.Tensor:
        """The critic's (B, R) values of this rank's shard (the driver computes GAE from them)."""
        return self.critic.model.compute_values(batch)

    @timed_work
    def update_critic(self, batch, values: torch.Tensor, returns: torch.Tensor, mini_batch_size: int) -> dict:
        """Clipped value-loss epochs towards this shard's GAE `returns`, clipped around the `values` they came from."""
        batch.tensors.update(values=values, returns=returns)
        return update_critic(self.critic, batch, self.config.worker.critic, mini_batch_size)

    # ---- latent SFT (workers/actor/sft_losses.py) -----------------------------------------------------------------
    def init_teacher(self, path: str) -> None:
        """A frozen copy sharded over the same workers: monet2's stage-1 teacher, or the stage-2 model that writes
        monet3's target latents. No second trainable copy exists."""
        self.teacher = ShardedModel(path, self.config.worker.actor, trainable=False)

    def release_teacher(self) -> None:
        self.teacher = None

    @timed_work
    def update_sft(self, batch, policy: str, stage: str) -> dict:
        """One optimizer step of latent-SFT `stage` on this rank's shard (a collective over the group)."""
        self._actor_changed()
        return sft_update(self.policies[policy], batch, self.config, stage, getattr(self, "teacher", None))

    @timed_work
    def write_latent_targets(self, batch, path: str) -> int:
        """The teacher's latents for this rank's rows, saved to `path`; returns how many rows were written."""
        latents = stage2_latents(self.teacher, batch, self.config.sft.micro_batch_size)
        rows = zip(batch.non_tensors["row_id"], latents, batch.non_tensors["write"])
        save_latents(path, {row_id: value for row_id, value, write in rows if write})
        return int(sum(batch.non_tensors["write"]))

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self, folder: str) -> None:
        """Every policy into `folder/<policy>/` (shards, optimizer, Hugging Face files); the critic, when there is
        one, into `folder/critic/` (shards and optimizer: it is never exported as a model)."""
        for name, policy in self.policies.items():
            policy_dir = role_dir(folder, name)
            policy.save(str(policy_dir))
            if self.rank == 0:
                self.model.save_hf_files(str(hf_files_dir(policy_dir)), settings_from_config(self.config, name),
                                         policy.adapter)
        if self.critic is not None:
            self.critic.save(str(role_dir(folder, CRITIC)))

    def load_checkpoint(self, folder: str) -> None:
        for name, policy in self.policies.items():
            policy.load(str(role_dir(folder, name)))
        if self.critic is not None:
            self.critic.load(str(role_dir(folder, CRITIC)))
        self._actor_changed()


def free_cached_memory() -> None:
    """Hand the CUDA caching allocator's free blocks back to the device, so whichever of the engine and the actor
    runs next can use the memory the other just released (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def owned_copies(stream) -> dict[str, torch.Tensor]:
    """{name: host copy} of a weight stream, whose tensors are valid only until the next one is drawn."""
    return {name: tensor.to("cpu", copy=True) for name, tensor in stream}
