"""Ray worker groups: one process per device over a placement group, with torch.distributed inside.

The driver talks to a group as to one object: `call` runs a method on every rank, `dispatch` splits a batch
evenly over the ranks and concatenates what they return. Workers run with num_gpus=0 on CPU, unchanged on GPUs.
Placement waits a bounded time and then says what the cluster lacks; `lost` tells which workers and nodes a failed
call lost, so the driver can report (or restart after) a lost node instead of printing a collective's traceback.
"""
from __future__ import annotations

import functools
import os
import time
from collections import defaultdict

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from common.cli import InputError


class PlacementTimeout(InputError):
    """The cluster could not hold the requested workers in time: the user starts nodes or asks for fewer workers."""


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
    """Base of worker classes: joins the group's torch.distributed process group (gloo on CPU; NCCL and gloo on
    GPU)."""

    def pop_busy_time(self) -> float:
        busy, self._busy_s = getattr(self, "_busy_s", 0.0), 0.0
        return busy

    def ping(self) -> bool:
        """Answers while the process lives: how `WorkerGroup.lost` tells a dead worker from a failed call."""
        return True

    def node_address(self) -> tuple[str, int]:
        import socket

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_distributed(self, rank: int, world_size: int, address: str, port: int, threads: int,
                         timeout_s: float = 600.0) -> None:
        """Join the group. On GPUs its backend is NCCL for CUDA tensors and gloo for host tensors (offloaded
        parameter shards, checkpoint metadata), so a collective on either kind works. A collective that waits
        longer than `timeout_s` (trainer.dist_timeout_s: a rank that died or hangs) fails instead of hanging."""
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(0)  # Ray exposes exactly the bundle's GPU to this process
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        self.rank, self.world_size = rank, world_size

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerGroup:
    def __init__(self, worker_cls, world_size: int, use_gpu: bool, name: str, cpus_per_worker: float = 1.0,
                 placement_timeout_s: float = 120.0, request: str = "",
                 remedy: str = "start the missing nodes or ask for fewer workers", dist_timeout_s: float = 600.0):
        """`request` (the config keys that asked for `world_size` workers) and `remedy` word the error when the
        cluster cannot place them within `placement_timeout_s`; `dist_timeout_s` bounds each collective's wait."""
        self.world_size, self.name = world_size, name
        bundle = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        self.placement = place(bundle, world_size, f"{name}-pg", placement_timeout_s, request, remedy)
        self.node_ids = [placement_group_table(self.placement)["bundles_to_node_id"][rank] for rank in range(world_size)]
        places = self.places(range(world_size))
        print(f"{name}: {world_size} workers on {len(places)} node{'' if len(places) == 1 else 's'}: "
              f"{'; '.join(f'{names} on {node_label(node)}' for node, names in places)}", flush=True)
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
        ray.get([worker.init_distributed.remote(rank, world_size, address, port, threads, dist_timeout_s)
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

    def lost(self, wait_s: float = 60.0) -> list[str]:
        """What this group lost, one entry per place: "node IP (id 1a2b3c4d) with policy-1" when the node is gone,
        "worker policy-1 on node IP" when only the process died. A worker that answers within `wait_s`, or is still
        busy then, is not lost. The wait covers a node whose raylet was killed: Ray reports its actors dead only
        once the cluster has noticed the node is gone."""
        pings = [worker.ping.remote() for worker in self.workers]
        ray.wait(pings, num_returns=len(pings), timeout=wait_s)
        dead = [rank for rank, ping in enumerate(pings) if died(ping)]
        return [f"node {node_label(node)} with {names}" if not node.get("Alive") else
                f"worker {names} on node {node_label(node)}" for node, names in self.places(dead)]

    def places(self, ranks) -> list[tuple[dict, str]]:
        """(node, "policy-0, policy-1") for the nodes that hold `ranks`; node: its `ray.nodes()` entry."""
        nodes = {node["NodeID"]: node for node in ray.nodes()}
        names = defaultdict(list)
        for rank in ranks:
            names[self.node_ids[rank]].append(f"{self.name}-{rank}")
        return [(nodes.get(node_id, {"NodeID": node_id}), ", ".join(group)) for node_id, group in names.items()]

    def shutdown(self) -> None:
        """Stop the workers and free their placement; safe to call again (a restart stops a group before the run's
        own shutdown does)."""
        if self.placement is None:
            return
        try:
            ray.get([worker.shutdown.remote() for worker in self.workers], timeout=30)
        except Exception:  # noqa: BLE001 - best effort: the processes are killed next anyway
            pass
        for worker in self.workers:
            ray.kill(worker)
        remove_placement_group(self.placement)
        self.placement = None


def place(bundle: dict, count: int, name: str, timeout_s: float, request: str, remedy: str):
    """A placement group of `count` bundles, ready; after `timeout_s` it is removed and PlacementTimeout says what
    was asked and what the cluster has (waiting forever on a cluster that lacks a node looks like a hang)."""
    group = placement_group([bundle] * count, strategy="PACK", name=name)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        asked = f"{request} = {count} workers" if request else f"{count} workers"
        raise PlacementTimeout(f"{asked} of {format_resources(bundle)} not placed within {timeout_s:g} s: "
                               f"{cluster_summary(bundle)}; {remedy}") from None
    return group


def cluster_summary(bundle: dict) -> str:
    """'the cluster has 1 node (CPU 2 free)': the live nodes and the free amount of each resource a bundle asks."""
    alive = [node for node in ray.nodes() if node["Alive"]]
    free = ray.available_resources()
    amounts = ", ".join(f"{key} {free.get(key, 0):g} free" for key in bundle)
    return f"the cluster has {len(alive)} node{'' if len(alive) == 1 else 's'} ({amounts})"


def format_resources(resources: dict) -> str:
    return "{" + ", ".join(f"{key}: {value:g}" for key, value in resources.items()) + "}"


def died(ref) -> bool:
    """True when `ref` (a finished ping) failed: the actor is dead or unreachable (a ping cannot fail otherwise;
    right after a node's raylet is killed Ray may call its actors "unavailable" rather than dead)."""
    if not ray.wait([ref], timeout=0)[0]:
        return False
    try:
        ray.get(ref)
    except ray.exceptions.RayError:
        return True
    return False


def node_label(node: dict) -> str:
    """'10.0.0.2 (id 1a2b3c4d)': nodes on one machine share the address, so the id tells them apart."""
    return f"{node.get('NodeManagerAddress', '?')} (id {node['NodeID'][:8]})"
