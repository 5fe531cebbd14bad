"""FSDP2 wrapping and distributed helpers shared by the actor and the reference model."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def shard_model(model: torch.nn.Module, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
                offload_params: bool = False, fsdp_size: int = -1):
    """fully_shard every decoder layer and vision block, then the root (gloo on CPU, NCCL on GPU).

    reshard_after_forward=False keeps gathered parameters between forward and backward (ZeRO-2-like);
    offload_params keeps the shards (and so the optimizer state next to them) in CPU memory between uses (GPU only);
    0 < fsdp_size < world shards within groups of fsdp_size ranks and replicates across groups (HSDP: e.g. shard
    inside a node, replicate over nodes).
    """
    mesh = device_mesh(dist.get_world_size(), fsdp_size)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if offload_params and torch.cuda.is_available():
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for module in model.modules():
        if type(module).__name__ in ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def device_mesh(world: int, fsdp_size: int):
    """1-D over all ranks, or 2-D (replicate, shard) for hybrid sharding."""
    if fsdp_size <= 0 or fsdp_size >= world:
        return init_device_mesh(device_type(), (world,))
    if world % fsdp_size:
        raise ValueError(f"worker.actor.fsdp.fsdp_size={fsdp_size} must divide the {world} ranks")
    return init_device_mesh(device_type(), (world // fsdp_size, fsdp_size), mesh_dim_names=("replicate", "shard"))


def all_reduce_sum(value: float | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64, device=device_type()).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def full_tensor(value):
    """A DTensor's global value (FSDP2 returns gradient norms as DTensors), else the tensor itself."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
