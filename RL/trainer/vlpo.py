"""The VLPO trainer: one step reads top to bottom (CleanRL's shape); the run around it is `RayTrainer`'s.

weight sync (when the actor changed) and generate (n per prompt, latent `monet` strategy) → reward (async on the
reward worker) → old log-probs → reference log-probs → advantages (KL in the reward when algorithm.use_kl_loss=false)
→ PPO update with the latent Gaussian terms.
"""
from __future__ import annotations

import ray
import torch

from algorithms import compute_advantages, make_kl_controller, masked_mean
from RL.protocol import Batch
from RL.trainer.base import RayTrainer, mean_dicts, timed
from RL.trainer.batching import BatchMaker, logprob_diff, rollout_metrics

POLICY = "actor"


class VLPOTrainer(RayTrainer):
    title = "VLPO"
    policy_names = (POLICY,)

    def __init__(self, config, train_loader, val_dataset, processor, total_steps: int):
        self.train_loader, self.val_dataset, self.tokenizer = train_loader, val_dataset, processor.tokenizer
        super().__init__(config, total_steps, has_validation=val_dataset is not None)
        algorithm = config.algorithm
        self.kl_controller = make_kl_controller(algorithm.kl_type, algorithm.kl_coef, algorithm.kl_target,
                                                algorithm.kl_horizon)
        self.uses_reference = not algorithm.disable_kl

    def start_workers(self) -> None:
        super().start_workers()
        self.reward = self.start_reward_worker(self.config.worker.reward)
        self.batches = BatchMaker(self.config, self.tokenizer, self.rollout, self.reward, self.train_loader,
                                  self.total_steps, policy=POLICY)

    def train_step(self, step: int) -> dict:
        timing: dict = {}
        kl_coef = self.kl_controller.value  # this step's coefficient; the controller moves after the update
        in_reward_kl = self.uses_reference and not self.config.algorithm.use_kl_loss
        self.pop_busy_time()  # forget validation and start-up work
        with timed(timing, "step"):
            with timed(timing, "gen"):  # includes timing_s/sync_weights
                with self.generation(timing):
                    batch, reward_future, gen_metrics = self.batches.make_training_batch(step)
                shards, key = self.policy.scatter(batch), f"s{step}"
            with timed(timing, "old"):
                agreement = self.policy.dispatch("compute_log_probs", shards, POLICY, key)
            kl = None
            if self.uses_reference:
                with timed(timing, "ref"):
                    parts = self.policy.dispatch("compute_ref_log_probs", shards, key,
                                                 self.config.algorithm.kl_penalty if in_reward_kl else None)
                    kl = torch.cat(parts) if in_reward_kl else None
            with timed(timing, "reward"):
                rewards = ray.get(reward_future)
            with timed(timing, "adv"):
                advantages, kl_metrics = self._advantages(batch, rewards, kl, kl_coef)
            with timed(timing, "update_actor"):
                per_rank = [{"advantages": part} for part in advantages.chunk(self.world_size)]
                actor_metrics = mean_dicts(self.policy.dispatch(
                    "update_policy", shards, POLICY, key, mini_batch_size=self._mini_batch_size(), kl_coef=kl_coef,
                    per_rank=per_rank))
        measured_kl = kl_metrics.get("reward/kl", actor_metrics.get("actor/kl_loss", 0.0))
        self.kl_controller.update(measured_kl, len(batch))  # EasyR1: n_steps = samples in the step
        busy = self.pop_busy_time()
        timing["timing_s/worker_busy"] = busy  # the slowest rank's compute; the rest of the step is driver + Ray
        timing["timing_s/driver_and_ray"] = timing["timing_s/step"] - busy
        tokens = float(batch.tensors["attention_mask"].sum())
        return {"step": step, **gen_metrics, **rewards.metrics, **rollout_metrics(batch, rewards),
                "rollout/logprob_diff": logprob_diff(agreement), **actor_metrics, **kl_metrics, **timing,
                "actor/kl_coef": kl_coef, "perf/throughput": tokens / timing["timing_s/step"] / self.world_size}

    def _advantages(self, batch: Batch, rewards, kl: torch.Tensor | None, kl_coef: float):
        """Advantages from the scores; with a KL in the reward (algorithm.use_kl_loss=false), from the scores minus
        kl_coef times the per-token KL between the behaviour policy and the reference (EasyR1)."""
        algorithm = self.config.algorithm
        mask = batch.tensors["response_mask"].float()
        metrics = {} if kl is None else {"reward/kl": float(masked_mean(kl, mask, dim=-1).mean())}
        extra = {"gamma": algorithm.gamma} if algorithm.adv_estimator == "reinforce_plus_plus" else {}
        scores = torch.tensor(rewards.overall, dtype=torch.float32)
        advantages, _ = compute_advantages(algorithm.adv_estimator, scores, mask, list(batch.non_tensors["uid"]),
                                           kl=kl, kl_coef=kl_coef if kl is not None else 0.0, **extra)
        return advantages, metrics

    def _mini_batch_size(self) -> int:
        actor = self.config.worker.actor
        return actor.global_batch_size * self.config.worker.rollout.n // self.world_size

    def validate(self, step: int) -> dict:
        return self.batches.validate(self.val_dataset, step, self.tracker)

    def state_dict(self) -> dict:
        return {"loader": self.train_loader.state_dict(), "kl_controller": self.kl_controller.state_dict(),
                "reward": ray.get(self.reward.state_dict.remote())}

    def load_state_dict(self, state: dict) -> None:
        self.train_loader.load_state_dict(state["loader"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        ray.get(self.reward.load_state_dict.remote(state["reward"]))

    def shutdown(self) -> None:
        super().shutdown()
        ray.kill(self.reward)
