"""Ray worker groups: one process per device over a placement group, with torch.distributed inside.

The driver talks to a group as to one object: `call` runs a method on every rank, `dispatch` splits a batch
evenly over the ranks and concatenates what they return. Workers run with num_gpus=0 on CPU, unchanged on GPUs.
"""
from __future__ import annotations

import functools
import os
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def timed_work(method):
    """Count a worker method's wall time as busy, so the driver can tell compute from Ray and driver overhead."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._busy_s = getattr(self, "_busy_s", 0.0) + time.perf_counter() - start

    return wrapper


class DistributedWorker:
    """Base of worker classes: joins the group's torch.distributed process group (gloo on CPU, NCCL on GPU)."""

    def pop_busy_time(self) -> float:
        busy, self._busy_s = getattr(self, "_busy_s", 0.0), 0.0
        return busy

    def node_address(self) -> tuple[str, int]:
        import socket

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_distributed(self, rank: int, world_size: int, address: str, port: int, threads: int) -> None:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(0)  # Ray exposes exactly the bundle's GPU to this process
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        self.rank, self.world_size = rank, world_size

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerGroup:
    def __init__(self, worker_cls, world_size: int, use_gpu: bool, name: str, cpus_per_worker: float = 1.0):
        self.world_size = world_size
        bundle = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        self.placement = placement_group([bundle] * world_size, strategy="PACK", name=f"{name}-pg")
        ray.get(self.placement.ready())
        remote_cls = ray.remote(worker_cls)
        self.workers = [
            remote_cls.options(
                num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0, name=f"{name}-{rank}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank),
            ).remote()
            for rank in range(world_size)
        ]
        address, port = ray.get(self.workers[0].node_address.remote())
        threads = max(1, int((os.cpu_count() or 1) // world_size)) if not use_gpu else 4
        ray.get([worker.init_distributed.remote(rank, world_size, address, port, threads)
                 for rank, worker in enumerate(self.workers)])

    def call(self, method: str, *args, **kwargs) -> list:
        """Run `method` on every rank with the same arguments; wait and return each rank's result."""
        return ray.get([getattr(worker, method).remote(*args, **kwargs) for worker in self.workers])

    def scatter(self, batch) -> list:
        """Each rank's equal shard of `batch`, put in the object store once: the passes that follow (old and
        reference log-probs, the update) send references, so a step's batch is serialized once, not per pass."""
        return [ray.put(shard) for shard in batch.chunk(self.world_size)]

    def dispatch(self, method: str, batch, *args, per_rank: list[dict] | None = None, **kwargs) -> list:
        """Run `method` on each rank's shard: `batch` is a Batch (split here) or `scatter`'s references.
        `per_rank[r]` holds rank r's own keyword arguments (e.g. its slice of the advantages)."""
        shards = batch if isinstance(batch, list) else batch.chunk(self.world_size)
        own = per_rank or [{}] * self.world_size
        return ray.get([getattr(worker, method).remote(shard, *args, **kwargs, **extra)
                        for worker, shard, extra in zip(self.workers, shards, own)])

    def shutdown(self) -> None:
        try:
            ray.get([worker.shutdown.remote() for worker in self.workers], timeout=30)
        except Exception:  # noqa: BLE001 - best effort: the processes are killed next anyway
            pass
        for worker in self.workers:
            ray.kill(worker)
        remove_placement_group(self.placement)
