"""A named trainable policy: a view of a `ShardedModel` (the whole model, or one of its adapters) with its own
optimizer and learning-rate schedule. Update rules (`workers.actor.updates`) are functions applied to one."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.checkpoint_layout import optimizer_dir, weights_dir
from workers.actor.optimizers import build_optimizer
from workers.actor.sharded_model import ShardedModel


@dataclass
class Policy:
    name: str
    model: ShardedModel
    adapter: str | None  # None: the policy is the whole model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    @classmethod
    def build(cls, name: str, model: ShardedModel, adapter: str | None, optim_config, total_steps: int) -> "Policy":
        params = model.trainable_parameters(adapter)
        optimizer = build_optimizer(params, optim_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim_config, total_steps))
        return cls(name, model, adapter, optimizer, scheduler)

    def active(self):
        """Context in which the shared model computes as this policy."""
        return self.model.use(self.adapter)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save(self, folder: str) -> None:
        """This policy's weights (whole model or adapter) and optimizer state as torch.distributed.checkpoint shards,
        which load at any world size."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save(self.model.sharded_state(self.adapter), checkpoint_id=str(weights_dir(folder)))
        state = {"optimizer": get_optimizer_state_dict(self.model.module, self.optimizer),
                 "scheduler": self.scheduler.state_dict()}
        dcp.save(state, checkpoint_id=str(optimizer_dir(folder)))

    def load(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        weights = self.model.sharded_state(self.adapter)
        dcp.load(weights, checkpoint_id=str(weights_dir(folder)))
        self.model.load_sharded_state(weights)
        state = {"optimizer": get_optimizer_state_dict(self.model.module, self.optimizer),
                 "scheduler": self.scheduler.state_dict()}
        dcp.load(state, checkpoint_id=str(optimizer_dir(folder)))
        set_optimizer_state_dict(self.model.module, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def lr_lambda(optim_config, total_steps: int):
    """Linear warm-up, then constant or cosine down to `min_lr_ratio`; one scheduler step per training step."""
    warmup = optim_config.lr_warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if optim_config.lr_scheduler_type != "cosine" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        floor = optim_config.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
