"""The VLPO trainer: one step reads top to bottom (CleanRL's shape); the run around it is `RayTrainer`'s.

weight sync (when the actor changed) and generate (n per prompt, latent `monet` strategy; with remax one greedy
rollout per prompt too) → reward (async on the reward worker) → old log-probs (and the policy's entropy) → reference
log-probs → values (gae: the critic) → advantages (KL in the reward when algorithm.use_kl_loss=false) → critic update
(gae) → PPO update with the latent Gaussian terms (skipped during trainer.critic_warmup).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import ray
import torch

from algorithms import compute_advantages, make_kl_controller, masked_mean, masked_var
from RL.protocol import Batch
from RL.trainer.base import RayTrainer, mean_dicts, timed
from RL.trainer.batching import BatchMaker, logprob_diff, rollout_metrics, sampling_params

POLICY = "actor"
CRITIC = "critic"


class VLPOTrainer(RayTrainer):
    title = "VLPO"
    policy_names = (POLICY,)

    def __init__(self, config, train_loader, val_dataset, processor, total_steps: int):
        self.train_loader, self.val_dataset, self.tokenizer = train_loader, val_dataset, processor.tokenizer
        self.uses_critic = config.algorithm.adv_estimator == "gae"
        self.roles = RayTrainer.roles + ((CRITIC,) if self.uses_critic else ())
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
                    baseline_future = self._greedy_baseline(batch, step) if self._remax else None
                shards, key = self.policy.scatter(batch), f"s{step}"
            with timed(timing, "old"):
                agreement = self.policy.dispatch("compute_log_probs", shards, POLICY, key)
            kl = None
            if self.uses_reference:
                with timed(timing, "ref"):
                    parts = self.policy.dispatch("compute_ref_log_probs", shards, key,
                                                 self.config.algorithm.kl_penalty if in_reward_kl else None)
                    kl = torch.cat(parts) if in_reward_kl else None
            values = None
            if self.uses_critic:
                with timed(timing, "values"):
                    values = torch.cat(self.policy.dispatch("compute_values", shards))
            with timed(timing, "reward"):
                rewards = ray.get(reward_future)
                baselines = None if baseline_future is None else ray.get(baseline_future).overall
            with timed(timing, "adv"):
                advantages, returns, kl_metrics = self._advantages(batch, rewards, kl, kl_coef, values, baselines)
            critic_metrics = self._update_critic(shards, batch, values, returns, timing) if self.uses_critic else {}
            actor_metrics = {}
            if step > self.config.trainer.critic_warmup:
                with timed(timing, "update_actor"):
                    per_rank = [{"advantages": part} for part in advantages.chunk(self.world_size)]
                    actor_metrics = mean_dicts(self.policy.dispatch(
                        "update_policy", shards, POLICY, key, mini_batch_size=self._mini_batch_size(),
                        kl_coef=kl_coef, per_rank=per_rank))
            else:  # critic warm-up: the actor stays as it is
                self.policy.call("forget", key)
        if actor_metrics or kl_metrics:  # nothing measured the KL in a warm-up step with a KL loss
            measured_kl = kl_metrics.get("reward/kl", actor_metrics.get("actor/kl_loss", 0.0))
            self.kl_controller.update(measured_kl, len(batch))  # EasyR1: n_steps = samples in the step
        busy = self.pop_busy_time()
        timing["timing_s/worker_busy"] = busy  # the slowest rank's compute; the rest of the step is driver + Ray
        timing["timing_s/driver_and_ray"] = timing["timing_s/step"] - busy
        tokens = float(batch.tensors["attention_mask"].sum())
        entropy = sum(p["entropy_sum"] for p in agreement) / max(1, sum(p["entropy_tokens"] for p in agreement))
        if baselines is not None:
            critic_metrics["reward/greedy_baseline"] = float(np.mean(baselines))
        return {"step": step, **gen_metrics, **rewards.metrics, **rollout_metrics(batch, rewards),
                "rollout/logprob_diff": logprob_diff(agreement), "actor/entropy": entropy, **actor_metrics,
                **critic_metrics, **kl_metrics, **timing, "actor/kl_coef": kl_coef,
                "perf/throughput": tokens / timing["timing_s/step"] / self.world_size}

    @property
    def _remax(self) -> bool:
        return self.config.algorithm.adv_estimator == "remax"

    def _greedy_baseline(self, batch: Batch, step: int):
        """ReMax's baseline: one greedy rollout of each prompt of `batch` (text argmax; latent steps at their
        Gaussian's mean, its mode: no exploration noise), scored by the reward worker; a future of its rewards."""
        n, rollout = self.config.worker.rollout.n, self.config.worker.rollout
        strategy = "monet" if rollout.sampling_strategy == "monet" else "greedy"
        params = dataclasses.replace(sampling_params(rollout, self.batches.response_length, "step", step, "baseline"),
                                     n=1, temperature=0.0, top_p=1.0, top_k=-1, strategy=strategy,
                                     latent_noise_std=0.0)
        greedy = self.batches.generate(prompt_items(batch, range(0, len(batch), n)), params, tag=f"b{step}")
        return self.batches.score_async(self.batches.reward_inputs(greedy), step)

    def _advantages(self, batch: Batch, rewards, kl: torch.Tensor | None, kl_coef: float,
                    values: torch.Tensor | None = None, baselines: list | None = None):
        """Advantages and returns from the scores; with a KL in the reward (algorithm.use_kl_loss=false), from the
        scores minus kl_coef times the per-token KL between the behaviour policy and the reference (EasyR1).
        gae reads the critic's `values`, remax each prompt's greedy `baselines` (one per prompt)."""
        algorithm = self.config.algorithm
        mask = batch.tensors["response_mask"].float()
        metrics = {} if kl is None else {"reward/kl": float(masked_mean(kl, mask, dim=-1).mean())}
        extra = {"reinforce_plus_plus": {"gamma": algorithm.gamma},
                 "gae": {"values": values, "gamma": algorithm.gamma, "lam": algorithm.lam},
                 "remax": {"reward_baselines": None if baselines is None else
                           torch.tensor(baselines, dtype=torch.float32).repeat_interleave(self.config.worker.rollout.n)},
                 }.get(algorithm.adv_estimator, {})
        scores = torch.tensor(rewards.overall, dtype=torch.float32)
        advantages, returns = compute_advantages(algorithm.adv_estimator, scores, mask, list(batch.non_tensors["uid"]),
                                                 kl=kl, kl_coef=kl_coef if kl is not None else 0.0, **extra)
        return advantages, returns, metrics

    def _update_critic(self, shards, batch: Batch, values: torch.Tensor, returns: torch.Tensor,
                       timing: dict) -> dict:
        """The critic's epochs towards the GAE returns, and EasyR1's value metrics over the response decisions."""
        with timed(timing, "update_critic"):
            per_rank = [{"values": v, "returns": r} for v, r in zip(values.chunk(self.world_size),
                                                                    returns.chunk(self.world_size))]
            metrics = mean_dicts(self.policy.dispatch("update_critic", shards, mini_batch_size=self._mini_batch_size(
                self.config.worker.critic.global_batch_size), per_rank=per_rank))
        mask = batch.tensors["response_mask"].float()
        explained = 1.0 - float(masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8))
        return {**metrics, "critic/values_mean": float(masked_mean(values, mask)),
                "critic/returns_mean": float(masked_mean(returns, mask)), "critic/vf_explained_var": explained}

    def _mini_batch_size(self, prompts: int | None = None) -> int:
        """Samples per rank in one optimizer step: `prompts` (default worker.actor.global_batch_size) × n / ranks."""
        prompts = self.config.worker.actor.global_batch_size if prompts is None else prompts
        return prompts * self.config.worker.rollout.n // self.world_size

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


def prompt_items(batch: Batch, rows) -> list[dict]:
    """Dataset-like items (what `BatchMaker.generate` takes) rebuilt from `rows` of a rollout batch: the prompt ids
    without their left padding, the images, and what the reward reads."""
    width = batch.tensors["prompts"].shape[1]
    non = batch.non_tensors
    return [{"input_ids": batch.tensors["prompts"][row][batch.tensors["attention_mask"][row, :width].bool()],
             "pixel_values": non["pixel_values"][row], "image_grid_thw": non["image_grid_thw"][row],
             "raw_prompt": non["raw_prompt"][row], "ground_truth": non["ground_truth"][row],
             "extra": non["extra"][row]} for row in rows]
