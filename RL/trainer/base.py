"""What every trainer shares: the worker groups, the run folder (checkpoints, metrics, resume) and the loop.

A trainer (VLPO, self-evolution) subclasses `RayTrainer` and supplies `train_step`, `validate` and its own state;
`fit` (resume → validation → steps → checkpoints → metrics) is the same for all. A step's metrics are stored in
the checkpoint that step writes, so a crash between the checkpoint and its metrics line loses nothing: resume
re-emits the line. Lines past the resumed step are dropped, so every step appears in metrics.jsonl exactly once.

A worker or node lost mid-run ends the run with one line that names it, the step and how to resume; with
`trainer.max_restarts=N` the driver instead stops every worker, starts them again (`start_workers`, which trainers
extend with whatever holds references to the workers) and resumes from its newest checkpoint, up to N times.

Every generation phase (a step's rollouts, validation) runs inside `generation()`: the engines wake, receive the
actor's weights if they changed since the last phase (lazily: an update or a checkpoint load marks them), generate,
and go back to sleep, so a colocated engine holds device memory only while it generates.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import ray
import torch
from omegaconf import OmegaConf
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from RL.checkpoint import CheckpointManager, crash_point, rng_state, set_rng_state
from RL.plots import plot_run
from RL.tracking import Tracker
from RL.trainer.ray_setup import init_ray
from common.cli import RunFailure
from workers.group import WorkerGroup
from workers.policy_worker import PolicyWorker
from workers.reward_worker import RewardWorker


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
    worker_class = PolicyWorker  # what each process of the groups runs (a subclass may extend it)

    def __init__(self, config, total_steps: int, has_validation: bool):
        self.config, self.total_steps, self.has_validation = config, total_steps, has_validation
        trainer = config.trainer
        self.run_dir = trainer.run_dir
        init_ray()
        self.world_size = trainer.nnodes * trainer.n_gpus_per_node
        self.start_workers()
        self.checkpoints = CheckpointManager(self.run_dir, trainer.save_limit)
        self.tracker = Tracker(self.run_dir, list(trainer.logger), trainer.project_name, trainer.experiment_name,
                               config_dict=OmegaConf.to_container(OmegaConf.structured(config)))
        self.step, self.restarts = 0, 0
        # Where a (re)start resumes from: the newest checkpoint (none with trainer.resume=false), then each save's.
        self.resume_point = self.checkpoints.latest() if trainer.resume else None
        self.start_state: dict | None = None  # the driver's state at step 0, for a restart before the first save
        self.pending_metrics: dict = {}  # added to the next step's line (a restart's count)

    def start_workers(self) -> None:
        """Start the worker groups and their roles. Called again after a lost worker or node, so a trainer extends
        it with everything that holds references to the workers (its reward worker, its batch maker)."""
        config, trainer = self.config, self.config.trainer
        use_gpu, colocate = torch.cuda.is_available(), config.worker.placement.colocate
        self.policy = self.start_group("policy", use_gpu)
        rollout = "rollout" in self.roles
        roles = [role for role in self.roles if role != "rollout"] + (["rollout"] if rollout and colocate else [])
        self.policy.call("init_roles", config, roles, list(self.policy_names), self.total_steps)
        self.rollout = self.policy
        self.served_version = None  # the actor weights version a separate rollout pool holds (None: none yet)
        if rollout and not colocate:  # a second pool of processes that only generates; weights travel through Ray
            self.rollout = self.start_group("rollout", use_gpu)
            self.rollout.call("init_roles", config, ["rollout"], list(self.policy_names), self.total_steps)

    def start_group(self, name: str, use_gpu: bool) -> WorkerGroup:
        trainer = self.config.trainer
        return WorkerGroup(
            self.worker_class, self.world_size, use_gpu, name=name, placement_timeout_s=trainer.placement_timeout_s,
            dist_timeout_s=trainer.dist_timeout_s,
            request=f"trainer.nnodes={trainer.nnodes} × trainer.n_gpus_per_node={trainer.n_gpus_per_node}",
            remedy=f"start the missing nodes or lower trainer.nnodes (waited trainer.placement_timeout_s="
                   f"{trainer.placement_timeout_s:g} s)")

    def start_reward_worker(self, reward_config):
        """The reward worker, on the driver's node: with num_cpus=0 Ray could put it on any node, and a lost worker
        node must not take the rewards with it."""
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return ray.remote(RewardWorker).options(num_cpus=0, scheduling_strategy=here).remote(
            reward_config, self.config.worker.rule_based_judge, str(self.run_dir))

    @property
    def groups(self) -> list[WorkerGroup]:
        return [self.policy] if self.rollout is self.policy else [self.policy, self.rollout]

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
        """Run to the last step; after a lost worker or node, restart (trainer.max_restarts) or say what was lost."""
        while True:
            try:
                return self.run()
            except ray.exceptions.RayError as error:
                self.restart_after(error)

    def run(self) -> None:
        trainer = self.config.trainer
        self.resume()
        if trainer.val_before_train and self.step == 0 and self.has_validation:
            self.tracker.log(0, self.validate_with_engines(0))
        if trainer.val_only:
            return
        with tqdm(total=self.total_steps, initial=self.step, desc=self.title, unit="step", dynamic_ncols=True) as bar:
            while self.step < self.total_steps:
                self.step += 1
                metrics = self.train_step(self.step)
                crash_point("after_step", self.step)
                if self._due(trainer.val_freq) and self.has_validation:
                    metrics.update(self.validate_with_engines(self.step))
                if self._due(trainer.save_freq):
                    with timed(metrics, "save_checkpoint"):
                        self.save(metrics)
                crash_point("before_metrics", self.step)
                metrics, self.pending_metrics = {**metrics, **self.pending_metrics}, {}
                self.tracker.log(self.step, metrics)
                bar.update(1)
        self.tracker.close()
        self.report_end()

    def restart_after(self, error: ray.exceptions.RayError) -> None:
        """Restart the workers and go on when `error` lost a worker or node and restarts are left; otherwise raise
        RunFailure naming what was lost. An error that lost nothing (a bug in a worker) is re-raised as it is."""
        lost = [entry for group in self.groups for entry in group.lost()]
        if not lost:
            raise error
        limit = self.config.trainer.max_restarts
        what = f"lost {'; '.join(lost)} at step {self.step}"
        if self.restarts >= limit:
            raise RunFailure(f"{what}; {self.resume_advice()}") from error
        self.restarts += 1
        print(f"{what}: restart {self.restarts} of {limit} (trainer.max_restarts), from "
              f"{self.resume_point[1] if self.resume_point else 'step 0'}", flush=True)
        self.shutdown()
        self.start_workers()
        self.pending_metrics["trainer/restarts"] = self.restarts

    def resume_advice(self) -> str:
        start = (f"from step {self.resume_point[0]} ({self.resume_point[1]})" if self.resume_point
                 else "from step 0 (no checkpoint yet)")
        return (f"re-run the same command to resume {start} once the cluster is whole again, or set "
                "trainer.max_restarts to restart by itself")

    def _due(self, freq: int) -> bool:
        return self.step == self.total_steps or (freq > 0 and self.step % freq == 0)

    def pop_busy_time(self) -> float:
        """The slowest rank's compute since the last call, summed over the groups (the rest is driver + Ray)."""
        return sum(max(group.call("pop_busy_time")) for group in self.groups)

    # ---- generation phases -------------------------------------------------------------------------------------
    @contextmanager
    def generation(self, timing: dict | None = None):
        """A generation phase: the engines wake and catch up with the actor's weights, then sleep after the block.
        The seconds the weight sync took (slowest rank) are added to `timing["timing_s/sync_weights"]` (0 when the
        weights had not changed); the block's own timer includes them. On an error the run stops or restarts its
        workers, so the engines are not put back to sleep then."""
        if "rollout" not in self.roles:
            yield
            return
        seconds = self._begin_rollout()
        if timing is not None:
            timing["timing_s/sync_weights"] = timing.get("timing_s/sync_weights", 0.0) + seconds
        yield
        self.rollout.call("end_rollout")

    def _begin_rollout(self) -> float:
        if self.rollout is self.policy:  # colocated: each rank streams its actor's shards into its own engine
            return max(self.policy.call("begin_rollout"))
        # A separate pool: rank 0's export stays in its object store; the pool's ranks fetch it from there, never
        # via the driver, and only when the actor changed since the pool last received it.
        version = self.policy.call("weights_version")[0]
        if version == self.served_version:
            return max(self.rollout.call("begin_rollout"))
        start = time.perf_counter()
        exports = [worker.export_weights.remote() for worker in self.policy.workers]
        self.rollout.call("begin_rollout", exports[0])
        ray.get(exports[1:])
        self.served_version = version
        return time.perf_counter() - start

    def validate_with_engines(self, step: int) -> dict:
        """`validate` inside a generation phase; its weight sync (if validation is the first phase after an
        update) is reported as `timing_s/val_sync_weights`."""
        timing: dict = {}
        with self.generation(timing):
            metrics = self.validate(step)
        return {**metrics, "timing_s/val_sync_weights": timing.get("timing_s/sync_weights", 0.0)}

    def report_end(self) -> None:
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
        self.resume_point = (self.step, self.checkpoints.finish(self.step, self.trainer_state(metrics)))

    def trainer_state(self, metrics: dict) -> dict:
        return {"step": self.step, "total_steps": self.total_steps, "rng": rng_state(), "metrics": metrics,
                **self.state_dict()}

    def restore(self, state: dict) -> None:
        set_rng_state(state["rng"])
        self.load_state_dict(state)
        self.step = state["step"]

    def resume(self) -> None:
        """Load `resume_point` into the workers and the driver. Without one the run starts at step 0, and a restart
        before the first save goes back to the driver state the run started with."""
        if self.resume_point is None:
            if self.start_state is None:
                self.start_state = self.trainer_state({})
            else:
                self.restore(self.start_state)
            self.tracker.truncate_after(-1)  # a run that crashed before its first save starts over cleanly
            return
        step, folder = self.resume_point
        self.policy.call("load_checkpoint", str(folder))  # the engines catch up at the next generation phase
        state = self.checkpoints.load_trainer_state(folder)
        self.restore(state)
        self.tracker.truncate_after(self.step)
        if self.tracker.last_step() < self.step:  # killed between the checkpoint and its metrics line
            self.tracker.log(self.step, state["metrics"])
        print(f"resumed {self.run_dir} from step {self.step} ({folder})")

    def shutdown(self) -> None:
        for group in self.groups:
            group.shutdown()
