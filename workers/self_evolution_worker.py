"""The policy worker of self-evolution: the released iReasoner KL options on top of `PolicyWorker`'s update.

`self_evolution.kl=full` scores the KL over the whole vocabulary against the reference (the base with the adapters
disabled, or the frozen copy); `self_evolution.kl_coef_update=per_step` passes the role's β controller to the worker,
which moves β after every optimizer step and returns where it ended (`actor/kl_coef_after`). With neither, the
update is `PolicyWorker.update_policy` unchanged.
"""
from __future__ import annotations

from algorithms.kl import ExponentialKLController
from workers.actor.self_evolution_updates import self_evolution_update
from workers.group import timed_work
from workers.policy_worker import PolicyWorker


class SelfEvolutionWorker(PolicyWorker):
    def update_policy(self, batch, policy: str, key: str, advantages, mini_batch_size: int, kl_coef: float,
                      kl_state: dict | None = None) -> dict:
        """`kl_state`: the role's β controller state (per_step); None moves no β here."""
        se = self.config.self_evolution
        if se.kl == "sampled" and kl_state is None:
            return super().update_policy(batch, policy, key, advantages, mini_batch_size, kl_coef)
        return self._released_update(batch, policy, key, advantages, mini_batch_size, kl_coef, kl_state)

    @timed_work
    def _released_update(self, batch, policy: str, key: str, advantages, mini_batch_size: int, kl_coef: float,
                         kl_state: dict | None) -> dict:
        se = self.config.self_evolution
        batch.tensors.update({**self._kept.pop(key), "advantages": advantages})
        self._actor_changed()
        controller = None
        if kl_state is not None:
            controller = ExponentialKLController(se.kl_coef, se.kl_target, se.kl_rate)
            controller.load_state_dict(kl_state)
        reference = (self.ref_model or self.model) if se.kl == "full" else None
        return self_evolution_update(self.policies[policy], batch, self.config.worker.actor, mini_batch_size, kl_coef,
                                     reference, controller)
