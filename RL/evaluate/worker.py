"""The evaluation worker: a `PolicyWorker` with only the rollout role (its `generate` serves the direct, ablation and
RMM passes), plus DMLR, which needs the native engine's model for its own forwards."""
from __future__ import annotations

from RL.evaluate.dmlr import run_dmlr
from workers.group import timed_work
from workers.policy_worker import PolicyWorker
from workers.rollout.native import NativeRolloutEngine


class EvalWorker(PolicyWorker):
    def init_evaluation(self, config) -> None:
        """The rollout engine on `worker.actor.model.model_path`, nothing else (no actor, no reference)."""
        self.init_roles(config, ["rollout"], ["actor"], 0)

    @timed_work
    def run_dmlr(self, prompts: list, settings, params, seeds: list[int]) -> list[dict]:
        if not isinstance(self.engine, NativeRolloutEngine):
            raise TypeError(f"DMLR runs its own forwards on the native engine's model, not on {type(self.engine)}")
        return [run_dmlr(self.engine, prompt, settings, params, seed) for prompt, seed in zip(prompts, seeds)]
