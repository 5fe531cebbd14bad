"""The policy's optimizers, the one place that builds them from `worker.actor.optim` (`build_optimizer`), and the
gradient clipping every optimizer step applies first (`clip_grad_norm`).

`adamw` is torch's AdamW over fp32 master weights. `adamw_bf16` keeps the trained weights in bf16 (half the weight
memory, no fp32 copy) and steps them with `KahanAdamW`: at Monet's lr 1e-6 an AdamW update is about 1e-6 per
step, while a bf16 weight of magnitude 1e-2 is spaced 6e-5 from its neighbours, so plain AdamW rounds nearly every
update away and the weights never move. Kahan summation keeps what the rounding lost in a buffer and adds it back
at the next step (as EasyR1's AnyPrecisionAdamW does), so the bf16 weights follow the fp32 trajectory to within
one bf16 rounding instead of drifting from it step by step.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from workers.actor.fsdp import device_type

LOW_PRECISION = (torch.bfloat16, torch.float16)
MOMENTS = ("exp_avg", "exp_avg_sq")


def build_optimizer(params, optim_config) -> torch.optim.Optimizer:
    """The optimizer `worker.actor.optim.strategy` names, with its lr, betas and weight decay."""
    kwargs = {"lr": optim_config.lr, "betas": tuple(optim_config.betas), "weight_decay": optim_config.weight_decay}
    if optim_config.strategy == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if optim_config.strategy == "adamw_bf16":
        return KahanAdamW(params, **kwargs)
    raise ValueError(f"worker.actor.optim.strategy: {optim_config.strategy!r} is not one of adamw, adamw_bf16")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (sharing its storage, so in-place updates reach the parameter), or
    the tensor itself."""
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale the gradients to a global L2 norm of at most `max_norm` (as torch's clip_grad_norm_); returns the norm
    before scaling, the same on every rank (inf or nan when a gradient is not finite, and then nothing is scaled).

    Each rank sums the squares of its local shards in fp32 (adamw_bf16's gradients are bf16, and a bf16 norm keeps
    3 digits), then the sums are added over the mesh dimensions a gradient is sharded on, never its replicated ones
    (HSDP). The scalar is reduced on the compute device: offloaded parameters keep their gradients on the host,
    which the GPU's NCCL group alone could not reduce.
    """
    grads = [param.grad for param in params if param.grad is not None]
    total = torch.zeros((), dtype=torch.float64, device=device_type())
    for (mesh, dims), members in by_sharding(grads).items():
        squares = torch.stack([torch.linalg.vector_norm(local(grad), dtype=torch.float32) for grad in members])
        squares = squares.square().sum().to(device=device_type(), dtype=torch.float64)
        for dim in dims:
            dist.all_reduce(squares, group=mesh.get_group(dim))
        total += squares
    norm = float(total.sqrt())
    scale = max_norm / (norm + 1e-6)
    if math.isfinite(norm) and scale < 1:
        for grad in grads:
            local(grad).mul_(scale)
    return norm


def by_sharding(grads: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    """Gradients grouped by (device mesh, the mesh dimensions they are sharded over); plain tensors: (None, ())."""
    groups = defaultdict(list)
    for grad in grads:
        if isinstance(grad, DTensor):
            dims = tuple(dim for dim, placement in enumerate(grad.placements) if placement.is_shard())
            groups[grad.device_mesh, dims].append(grad)
        else:
            groups[None, ()].append(grad)
    return groups


class KahanAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, as torch.optim.AdamW) whose updates reach bf16/fp16
    weights through Kahan-compensated summation. fp32 parameters get the plain AdamW update and no buffer.

    State per parameter: `exp_avg` and `exp_avg_sq` in `moment_dtype` (fp32 by default) and, for low-precision
    parameters, `compensation` in the parameter's dtype: the part of the exact weight its rounded value lacks.
    The moments stay fp32 because with beta2 = 0.999 the second moment changes by 0.1% a step, below bf16's
    0.4% resolution, so a bf16 `exp_avg_sq` stalls part-way to its value and mis-scales every step (EasyR1 keeps
    them in bf16 to save 4 bytes a parameter). The compensation is tiny next to the weight, so bf16 holds it to
    about 2^-17 of the weight.

    Under FSDP2 the arithmetic runs on each rank's local shard; every state tensor is created `zeros_like` the
    parameter (a DTensor with its sharding), so torch.distributed.checkpoint saves and restores it at any world
    size, and offloaded parameters step on the CPU where their shards live.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, moment_dtype: torch.dtype = torch.float32):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, self._state_of(param), group)
        return loss

    def _state_of(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            for key in MOMENTS:
                state[key] = torch.zeros_like(param, dtype=self.moment_dtype, memory_format=torch.preserve_format)
            if param.dtype in LOW_PRECISION:
                state["compensation"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _update(self, param: torch.Tensor, state: dict, group: dict) -> None:
        """One AdamW step of `param`; the new value goes through the compensation buffer when there is one."""
        beta1, beta2 = group["betas"]
        lr, decay = group["lr"], group["weight_decay"]
        state["step"] += 1
        step = float(state["step"])
        grad = local(param.grad).to(self.moment_dtype)
        exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        step_size = lr / (1 - beta1 ** step)
        weight = local(param)
        if "compensation" not in state:
            weight.mul_(1 - lr * decay).addcdiv_(exp_avg, denom, value=-step_size)
            return
        compensation = local(state["compensation"])
        exact = weight.float()
        # what the weight should gain: this step's decay and Adam update plus what earlier roundings dropped
        delta = compensation.float().add_(exact, alpha=-lr * decay).addcdiv_(exp_avg.float(), denom.float(),
                                                                              value=-step_size)
        weight.copy_(exact + delta)
        compensation.copy_(delta.sub_(weight.float() - exact))

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every floating state tensor to its parameter's dtype on load, which would round the fp32
        moments of bf16 parameters to bf16 (and lose a resumed run's precision); put the saved ones back."""
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for pid, param in zip(saved_ids, params):
            saved = state_dict["state"].get(pid, {})
            for key in MOMENTS:
                if key in saved and key in self.state[param]:
                    self.state[param][key] = saved[key].to(device=local(param).device, copy=True)
