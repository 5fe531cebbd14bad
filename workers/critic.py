"""The critic for GAE (`algorithm.adv_estimator=gae`, `worker.critic.*`): the policy's latent-aware backbone with a
scalar value head, sharded with FSDP2 over the policy workers like the actor and the reference.

V(s_t) for response position t is read from the final hidden state one position before t, the state from which
the action at t (a token, or a latent step whose Gaussian mean the actor reads at that same position) is taken;
the recorded latents are fed as input embeddings exactly as the actor scores them. The value head starts at zero,
so the first values are 0 and the first GAE advantages are the whitened reward-to-go.

The critic is a `Policy` (its own optimizer, schedule and DCP checkpoint under `<step>/critic/`); `CriticModel`
offers what `Policy` and the update rules use of a `ShardedModel`, and `update_critic` is `optimizer_step` and
`run_epochs` applied with the clipped value loss (`algorithms.compute_value_loss`). Its micro-batches are the
actor's kind: a fixed number of samples, or with `worker.critic.dynamic_batching` a token budget
(`CriticConfig.token_budget`), which changes neither the values nor the loss.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from algorithms import compute_value_loss
from monet_models.transformers.packing import unpack
from workers.actor.model_inputs import forward_args, micro_batches, model_inputs
from workers.actor.policy import Policy
from workers.actor.sharded_model import load_on_rank0, shard_loaded
from workers.actor.updates import GlobalCounts, optimizer_step, run_epochs

ROLE = "critic"


class ValueModel(torch.nn.Module):
    """The latent model and a linear value head on its final-norm hidden states: (B, L) values, one per position."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        width = getattr(backbone.config, "text_config", backbone.config).hidden_size
        self.value_head = torch.nn.Linear(width, 1, dtype=backbone.dtype)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, **inputs) -> torch.Tensor:
        hidden = self.backbone(**inputs, latent_mode=True, compute_logits=False).hidden_states
        # a new tensor, not a view: FSDP2 warns about model outputs that are views
        return self.value_head(hidden).squeeze(-1).float().clone()


class CriticModel:
    """A `ValueModel` sharded over the worker group; loaded as the actor is (rank 0 reads, the others get their
    shards by broadcast), with fp32 master weights unless `worker.critic.optim.strategy=adamw_bf16`."""

    def __init__(self, model_path: str, critic_config):
        self.config = critic_config
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        dtype = "bf16" if critic_config.optim.strategy == "adamw_bf16" else "fp32"
        backbone, self.processor = load_on_rank0(model_path, dtype, critic_config.model.override_config)
        on_meta = backbone.device.type == "meta"
        if critic_config.model.enable_gradient_checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if critic_config.model.freeze_vision_tower:
            backbone.model.visual.requires_grad_(False)
        if backbone.lm_head.weight is not backbone.get_input_embeddings().weight:
            # unused by the critic: no gradient, so no optimizer state (a checkpoint must hold state for every
            # trainable parameter to load); tied, it is the embedding table and trains as one
            backbone.lm_head.requires_grad_(False)
        with torch.device("meta") if on_meta else nullcontext():
            model = ValueModel(backbone)
        self.module = shard_loaded(model, None if on_meta else model.state_dict(), critic_config.fsdp,
                                   critic_config.offload, self.device)

    # ---- what `Policy` uses ----------------------------------------------------------------------------------
    @contextmanager
    def use(self, adapter: str | None):
        yield  # one model, no adapters

    def trainable_parameters(self, adapter: str | None = None) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def sharded_state(self, adapter: str | None = None) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module)

    def load_sharded_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, state)

    # ---- values ----------------------------------------------------------------------------------------------
    def values(self, micro) -> torch.Tensor:
        """(B, R) V(s_t) at each response position of `micro`, with gradients in train mode."""
        ids, common, keep, _ = forward_args(self.module.backbone, model_inputs(micro, self.device),
                                            self.config.padding_free)
        values = torch.nn.functional.pad(self.module(input_ids=ids, **common)[:, :-1], (1, 0))
        if self.config.padding_free:
            values = unpack(values, keep)
        return values[:, -micro.tensors["responses"].shape[1]:]

    @torch.no_grad()
    def compute_values(self, batch) -> torch.Tensor:
        """(B, R) values of a whole batch on the host, 0 outside the response mask (EasyR1's compute_values)."""
        self.module.eval()
        cfg = self.config
        budget = cfg.token_budget(update=False)
        parts = [self.values(micro).cpu() for micro in micro_batches(
            batch, cfg.micro_batch_size_per_device_for_experience, budget, cfg.padding_free)]
        return torch.cat(parts) * batch.tensors["response_mask"].float()


def build_critic(config, total_steps: int) -> Policy:
    """The critic role: `worker.critic.model.model_path` (default the actor's folder) with its own optimizer."""
    critic = config.worker.critic
    model = CriticModel(critic.model.model_path or config.worker.actor.model.model_path, critic)
    return Policy.build(ROLE, model, None, critic.optim, total_steps)


def value_loss(critic: Policy, micro, counts: GlobalCounts, cfg):
    """The clipped value loss of one micro-batch: its share of the global `loss_avg_mode` mean."""
    values = critic.model.values(micro)
    mask = micro.tensors["response_mask"].to(values.device).float()
    per_position, metrics = compute_value_loss(values, micro.tensors["returns"], micro.tensors["values"], mask,
                                               cfg.cliprange_value)
    loss = counts.mean(per_position, mask, cfg.loss_avg_mode)
    return loss, {"critic/vf_loss": loss.detach()}, {f"critic/{key}": value for key, value in metrics.items()}


def update_critic(critic: Policy, batch, cfg, mini_batch_size: int) -> dict:
    """`worker.critic.ppo_epochs` passes over `batch` (with `values` and `returns`), one optimizer step per
    mini-batch; metrics under `critic/` (vf_loss, vf_clipfrac, vpred_mean, grad_norm, lr)."""
    loss_fn = lambda pol, micro, counts: value_loss(pol, micro, counts, cfg)  # noqa: E731
    metrics = run_epochs(critic, batch, mini_batch_size, cfg.ppo_epochs,
                         lambda mini: optimizer_step(critic, mini, loss_fn, cfg.micro_batch_size_per_device_for_update,
                                                     cfg.max_grad_norm, cfg.token_budget(update=True),
                                                     cfg.padding_free))
    return {key.replace("actor/", "critic/", 1): value for key, value in metrics.items()}
