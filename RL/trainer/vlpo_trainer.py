"""The VLPO trainer: the driver loop over Ray workers (CleanRL-style: one step reads top to bottom).

generate (n per prompt, latent `monet` strategy) → reward (async on the reward worker) → old log-probs →
reference log-probs → advantages → PPO update with the latent Gaussian terms → metrics, validation, checkpoint.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
from omegaconf import OmegaConf
import ray
import torch
from tqdm import tqdm

from RL.algorithms import compute_advantages, make_kl_controller
from RL.checkpoint import CheckpointManager, rng_state, set_rng_state
from RL.protocol import Batch
from RL.tracking import Tracker
from RL.trainer.batching import BatchMaker, rollout_metrics
from RL.trainer.ray_setup import init_ray
from workers.group import WorkerGroup
from workers.policy_worker import PolicyWorker
from workers.reward_worker import RewardWorker


@contextmanager
def timed(timing: dict, name: str):
    start = time.perf_counter()
    yield
    timing[f"timing_s/{name}"] = timing.get(f"timing_s/{name}", 0.0) + time.perf_counter() - start


class VLPOTrainer:
    def __init__(self, config, train_loader, val_dataset, processor, total_steps: int):
        self.config = config
        trainer = config.trainer
        self.run_dir = trainer.run_dir
        self.train_loader, self.val_dataset = train_loader, val_dataset
        self.total_steps = total_steps
        init_ray()
        self.world_size = trainer.nnodes * trainer.n_gpus_per_node
        use_gpu, colocate = torch.cuda.is_available(), config.worker.placement.colocate
        self.policy = WorkerGroup(PolicyWorker, self.world_size, use_gpu, name="policy")
        self.policy.call("init_roles", config, ["actor", "ref"] + (["rollout"] if colocate else []), self.total_steps)
        self.rollout = self.policy
        if not colocate:  # a second pool of processes that only generates; weights travel through Ray
            self.rollout = WorkerGroup(PolicyWorker, self.world_size, use_gpu, name="rollout")
            self.rollout.call("init_roles", config, ["rollout"], self.total_steps)
        self.reward = ray.remote(RewardWorker).options(num_cpus=0).remote(
            config.worker.reward, config.worker.rule_based_judge, str(self.run_dir))
        self.batches = BatchMaker(config, processor.tokenizer, self.rollout, self.reward, train_loader, total_steps)
        algorithm = config.algorithm
        self.kl_controller = make_kl_controller(algorithm.kl_type, algorithm.kl_coef, algorithm.kl_target,
                                                algorithm.kl_horizon)
        self.checkpoints = CheckpointManager(self.run_dir, trainer.save_limit)
        self.tracker = Tracker(self.run_dir, list(trainer.logger), trainer.project_name, trainer.experiment_name,
                               config_dict=OmegaConf.to_container(OmegaConf.structured(config)))
        self.step = 0

    # ---- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> None:
        trainer = self.config.trainer
        self.resume()
        if trainer.val_before_train and self.step == 0 and self.val_dataset is not None:
            self.tracker.log(0, self.validate(0))
        if trainer.val_only:
            return
        bar = tqdm(total=self.total_steps, initial=self.step, desc="VLPO", unit="step", dynamic_ncols=True)
        while self.step < self.total_steps:
            self.step += 1
            metrics = self.train_step(self.step)
            if self.val_dataset is not None and trainer.val_freq > 0 and (
                    self.step % trainer.val_freq == 0 or self.step == self.total_steps):
                metrics.update(self.validate(self.step))
            if self.step == self.total_steps or (trainer.save_freq > 0 and self.step % trainer.save_freq == 0):
                with timed(metrics, "save_checkpoint"):
                    self.save()
            self.tracker.log(self.step, metrics)
            bar.update(1)
        bar.close()
        self.tracker.close()

    def _pop_busy_time(self) -> float:
        groups = [self.policy] if self.rollout is self.policy else [self.policy, self.rollout]
        return sum(max(group.call("pop_busy_time")) for group in groups)

    def train_step(self, step: int) -> dict:
        timing: dict = {}
        kl_coef = self.kl_controller.value  # this step's coefficient; the controller moves after the update
        self._pop_busy_time()  # forget validation and start-up work
        with timed(timing, "step"):
            with timed(timing, "gen"):
                batch, reward_future, gen_metrics = self.batches.make_training_batch(step)
            with timed(timing, "old"):
                batch.tensors["old_log_probs"] = self._gather(self.policy.dispatch("compute_log_probs", batch))
            if self.config.worker.actor.use_kl_loss:
                with timed(timing, "ref"):
                    batch.tensors["ref_log_probs"] = self._gather(self.policy.dispatch("compute_ref_log_probs", batch))
            with timed(timing, "reward"):
                rewards = ray.get(reward_future)
            with timed(timing, "adv"):
                self._add_advantages(batch, rewards)
            with timed(timing, "update_actor"):
                actor_metrics = self._mean_dicts(self.policy.dispatch(
                    "update_actor", batch, self._mini_batch_size(), kl_coef))
            with timed(timing, "sync_weights"):
                self.sync_rollout_weights()
        self.kl_controller.update(actor_metrics.get("actor/kl_loss", 0.0), 1)
        busy = self._pop_busy_time()
        timing["timing_s/worker_busy"] = busy  # the slowest rank's compute; the rest of the step is driver + Ray
        timing["timing_s/driver_and_ray"] = timing["timing_s/step"] - busy
        tokens = float(batch.tensors["attention_mask"].sum())
        return {"step": step, **gen_metrics, **rewards.metrics, **rollout_metrics(batch, rewards), **actor_metrics,
                **timing, "actor/kl_coef": kl_coef,
                "perf/throughput": tokens / timing["timing_s/step"] / self.world_size}

    # ---- pieces ----------------------------------------------------------------------------------------------
    def sync_rollout_weights(self) -> None:
        if self.rollout is self.policy:
            self.policy.call("sync_rollout_weights")
            return
        state = ray.put(self.policy.call("export_weights")[0])
        self.rollout.call("load_rollout_weights", state)

    def _add_advantages(self, batch: Batch, rewards) -> None:
        algorithm = self.config.algorithm
        scores = torch.tensor(rewards.overall, dtype=torch.float32)
        extra = {"gamma": algorithm.gamma} if algorithm.adv_estimator == "reinforce_plus_plus" else {}
        advantages, returns = compute_advantages(algorithm.adv_estimator, scores, batch.tensors["response_mask"].float(),
                                                 list(batch.non_tensors["uid"]), **extra)
        batch.tensors["advantages"] = advantages
        batch.tensors["returns"] = returns

    def _mini_batch_size(self) -> int:
        actor = self.config.worker.actor
        return actor.global_batch_size * self.config.worker.rollout.n // self.world_size

    @staticmethod
    def _gather(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=0)

    @staticmethod
    def _mean_dicts(parts: list[dict]) -> dict:
        return {key: float(np.mean([part[key] for part in parts if key in part])) for key in parts[0]}

    def validate(self, step: int) -> dict:
        return self.batches.validate(self.val_dataset, step, self.tracker)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save(self) -> None:
        folder = self.checkpoints.begin(self.step)
        self.policy.call("save_checkpoint", str(folder))
        state = {"step": self.step, "loader": self.train_loader.state_dict(), "rng": rng_state(),
                 "kl_controller": self.kl_controller.state_dict(), "reward": ray.get(self.reward.state_dict.remote())}
        self.checkpoints.finish(self.step, state)

    def resume(self) -> None:
        latest = self.checkpoints.latest() if self.config.trainer.resume else None
        if latest is None:
            self.tracker.truncate_after(0)  # a run that crashed before its first save starts over cleanly
            return
        step, folder = latest
        self.policy.call("load_checkpoint", str(folder))
        self.sync_rollout_weights()
        state = self.checkpoints.load_trainer_state(folder)
        self.train_loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        ray.get(self.reward.load_state_dict.remote(state["reward"]))
        self.step = state["step"]
        self.tracker.truncate_after(self.step)
        print(f"resumed {self.run_dir} from step {self.step} ({folder})")

    def shutdown(self) -> None:
        if self.rollout is not self.policy:
            self.rollout.shutdown()
        self.policy.shutdown()
        ray.kill(self.reward)
