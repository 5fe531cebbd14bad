"""What every trainer shares: the worker groups, the run folder (checkpoints, metrics, resume) and the loop.

A trainer (VLPO, self-evolution) subclasses `RayTrainer` and supplies `train_step`, `validate` and its own state;
`fit` (resume → validation → steps → checkpoints → metrics) is the same for all. A step's metrics are stored in
the checkpoint that step writes, so a crash between the checkpoint and its metrics line loses nothing: resume
re-emits the line. Lines past the resumed step are dropped, so every step appears in metrics.jsonl exactly once.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import ray
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from RL.checkpoint import CheckpointManager, crash_point, rng_state, set_rng_state
from RL.tracking import Tracker
from RL.trainer.ray_setup import init_ray
from workers.group import WorkerGroup
from workers.policy_worker import PolicyWorker


@contextmanager
def timed(timing: dict, name: str):
    """Add the block's wall time to `timing["timing_s/<name>"]`."""
    start = time.perf_counter()
    yield
    timing[f"timing_s/{name}"] = timing.get(f"timing_s/{name}", 0.0) + time.perf_counter() - start


def mean_dicts(parts: list[dict]) -> dict:
    """Key-wise mean of the per-rank metric dicts a worker group returns."""
    return {key: float(np.mean([part[key] for part in parts if key in part])) for key in parts[0]}


class RayTrainer:
    title = "train"
    policy_names: tuple[str, ...] = ("actor",)
    roles: tuple[str, ...] = ("actor", "ref", "rollout")  # PolicyWorker roles to start (SFT: the actor only)

    def __init__(self, config, total_steps: int, has_validation: bool):
        self.config, self.total_steps, self.has_validation = config, total_steps, has_validation
        trainer = config.trainer
        self.run_dir = trainer.run_dir
        init_ray()
        self.world_size = trainer.nnodes * trainer.n_gpus_per_node
        use_gpu, colocate = torch.cuda.is_available(), config.worker.placement.colocate
        self.policy = WorkerGroup(PolicyWorker, self.world_size, use_gpu, name="policy")
        rollout = "rollout" in self.roles
        roles = [role for role in self.roles if role != "rollout"] + (["rollout"] if rollout and colocate else [])
        self.policy.call("init_roles", config, roles, list(self.policy_names), total_steps)
        self.rollout = self.policy
        if rollout and not colocate:  # a second pool of processes that only generates; weights travel through Ray
            self.rollout = WorkerGroup(PolicyWorker, self.world_size, use_gpu, name="rollout")
            self.rollout.call("init_roles", config, ["rollout"], list(self.policy_names), total_steps)
        self.checkpoints = CheckpointManager(self.run_dir, trainer.save_limit)
        self.tracker = Tracker(self.run_dir, list(trainer.logger), trainer.project_name, trainer.experiment_name,
                               config_dict=OmegaConf.to_container(OmegaConf.structured(config)))
        self.step = 0

    # ---- what a trainer supplies -------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def validate(self, step: int) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Driver-side state to checkpoint besides the step, the RNG streams and the step's metrics."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> None:
        trainer = self.config.trainer
        self.resume()
        if trainer.val_before_train and self.step == 0 and self.has_validation:
            self.tracker.log(0, self.validate(0))
        if trainer.val_only:
            return
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.title, unit="step", dynamic_ncols=True)
        while self.step < self.total_steps:
            self.step += 1
            metrics = self.train_step(self.step)
            crash_point("after_step", self.step)
            if self._due(trainer.val_freq) and self.has_validation:
                metrics.update(self.validate(self.step))
            if self._due(trainer.save_freq):
                with timed(metrics, "save_checkpoint"):
                    self.save(metrics)
            crash_point("before_metrics", self.step)
            self.tracker.log(self.step, metrics)
            bar.update(1)
        bar.close()
        self.tracker.close()
        self.report_end()

    def _due(self, freq: int) -> bool:
        return self.step == self.total_steps or (freq > 0 and self.step % freq == 0)

    def pop_busy_time(self) -> float:
        """The slowest rank's compute since the last call, summed over the groups (the rest is driver + Ray)."""
        groups = [self.policy] if self.rollout is self.policy else [self.policy, self.rollout]
        return sum(max(group.call("pop_busy_time")) for group in groups)

    def sync_rollout_weights(self) -> None:
        if "rollout" not in self.roles:
            return
        if self.rollout is self.policy:
            self.policy.call("sync_rollout_weights")
            return
        # Rank 0's export stays in its object store; the rollout ranks fetch it from there, never via the driver.
        exports = [worker.export_weights.remote() for worker in self.policy.workers]
        self.rollout.call("load_rollout_weights", exports[0])
        ray.get(exports[1:])

    def report_end(self) -> None:
        from tools.plot_metrics import plot_run

        latest = self.checkpoints.latest()
        plots = plot_run(self.run_dir)[-1].parent
        print(f"run {self.config.trainer.experiment_name} finished at step {self.step}: {self.run_dir}\n"
              f"  newest checkpoint: {latest[1] if latest else 'none'}\n"
              f"  metrics: {self.tracker.metrics_path}\n  plots: {plots} (redraw: python -m tools.plot_metrics "
              f"{self.run_dir})")

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save(self, metrics: dict) -> None:
        folder = self.checkpoints.begin(self.step)
        self.policy.call("save_checkpoint", str(folder))
        state = {"step": self.step, "total_steps": self.total_steps, "rng": rng_state(), "metrics": metrics,
                 **self.state_dict()}
        self.checkpoints.finish(self.step, state)

    def resume(self) -> None:
        latest = self.checkpoints.latest() if self.config.trainer.resume else None
        if latest is None:
            self.tracker.truncate_after(-1)  # a run that crashed before its first save starts over cleanly
            self.sync_rollout_weights()  # the engines serve exactly the actor's initial weights (and adapters)
            return
        step, folder = latest
        self.policy.call("load_checkpoint", str(folder))
        self.sync_rollout_weights()
        state = self.checkpoints.load_trainer_state(folder)
        set_rng_state(state["rng"])
        self.load_state_dict(state)
        self.step = state["step"]
        self.tracker.truncate_after(self.step)
        if self.tracker.last_step() < self.step:  # killed between the checkpoint and its metrics line
            self.tracker.log(self.step, state["metrics"])
        print(f"resumed {self.run_dir} from step {self.step} ({folder})")

    def shutdown(self) -> None:
        if self.rollout is not self.policy:
            self.rollout.shutdown()
        self.policy.shutdown()
