"""Full tensors from FSDP shards through one shared-memory bucket per host: the weight sync's transport for CPU ranks.

Why: CPU ranks run their collectives over gloo, whose all-gather moves about 0.5 GB/s over loopback TCP on two cores
(a sync of the 3B-width probe took 19x a memory copy of the same bytes). Ranks on one host can do what verl does with
CUDA IPC buffers: each rank writes its rows of a tensor straight into a bucket of shared memory, at the full tensor's
offsets, in the engine's dtype; after a barrier every rank reads the full tensors as views of the bucket, and its engine
copies them into its own weights. The bucket is created at the first sync and kept: allocating and faulting in its
pages again every sync costs more than the copy it serves. Its file under /dev/shm is unlinked as soon as every rank
has mapped it, so nothing is left behind, even after SIGKILL, and nothing reaches storage (tmpfs is memory).

A GPU group, a group spanning hosts, a hybrid (2-D) mesh or a host without room in /dev/shm uses the collective
all-gather instead (`ShardedModel.stream_weights` decides once per stream, the same on every rank).
"""
from __future__ import annotations

import os
import socket
import uuid
from typing import Callable, Iterator

import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"
ALIGN = 64  # bytes: every tensor in the bucket starts on a cache line, so its view has any dtype's alignment


def row_sharded(value) -> bool:
    """A DTensor on a 1-D mesh, sharded on dim 0 (FSDP2's layout); other tensors are not gathered through a bucket."""
    from torch.distributed.tensor import DTensor, Shard

    return (isinstance(value, DTensor) and value.device_mesh.ndim == 1 and len(value.placements) == 1
            and value.placements[0] == Shard(0))


def bucket_bytes_needed(buckets: list[list], dtype: torch.dtype | None) -> int:
    """The largest aligned size of any bucket's row-sharded tensors (in `dtype` where given)."""
    return max((sum(_aligned(_nbytes(value, dtype)) for _, value in bucket if row_sharded(value))
                for bucket in buckets), default=0)


class HostBucket:
    """A shared-memory buffer mapped by every rank of `group`, all on this host. Build it with `open` (collective)."""

    def __init__(self, group, buffer: torch.Tensor):
        self.group, self.buffer = group, buffer
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @classmethod
    def open(cls, group, nbytes: int) -> "HostBucket | None":
        """A bucket of `nbytes` for `group`, or None on every rank when the group cannot share one (CUDA, ranks on
        several hosts, no /dev/shm, or not enough room there): a collective, the same answer on every rank."""
        if torch.cuda.is_available() or not _one_host(group):
            return None
        rank = dist.get_rank(group)
        path = [os.path.join(SHM_DIR, f"latent_rl_sync_{uuid.uuid4().hex}") if rank == 0 else None]
        dist.broadcast_object_list(path, src=dist.get_global_rank(group, 0), group=group)
        created = _create(path[0], nbytes) if rank == 0 else True
        buffer = None
        if _all(created, group):
            try:
                buffer = torch.from_file(path[0], shared=True, size=nbytes, dtype=torch.uint8)
            except RuntimeError:
                buffer = None
        mapped = _all(buffer is not None, group)  # every rank has mapped it (or failed): the name can go now
        if rank == 0 and created:
            os.unlink(path[0])
        return cls(group, buffer) if mapped else None

    def gather(self, bucket: list, dtype: torch.dtype | None, gather_other: Callable[[torch.Tensor], torch.Tensor]
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) for each entry of `bucket`: row-sharded tensors as views of the shared buffer, valid
        until the next bucket is gathered; the others (replicated buffers) through `gather_other` (the caller's
        collective gather). Every rank writes its rows, a barrier, then the views; the barrier after the last one
        keeps a rank from overwriting what another still reads."""
        views, offset = {}, 0
        with torch.no_grad():
            for name, value in bucket:
                if row_sharded(value):
                    views[name], offset = self._write_rows(value, dtype, offset)
        dist.barrier(group=self.group)
        for name, value in bucket:
            yield name, views[name] if name in views else gather_other(value)
        dist.barrier(group=self.group)

    def _write_rows(self, value, dtype: torch.dtype | None, offset: int) -> tuple[torch.Tensor, int]:
        """This rank's rows of `value` written into its place in the full tensor at `offset`: the full tensor's view
        and the next free offset. FSDP2 shards dim 0 like torch.chunk: rank r holds rows [r*c, (r+1)*c), c = ceil."""
        dtype = dtype if dtype is not None and value.is_floating_point() else value.dtype
        shape, local = value.shape, value.to_local()
        nbytes = shape.numel() * dtype.itemsize
        full = self.buffer[offset:offset + nbytes].view(dtype).view(shape)
        chunk = -(-shape[0] // self.world) if shape else 0
        start = min(self.rank * chunk, shape[0])
        if local.shape[0] != max(0, min(chunk, shape[0] - start)):
            raise RuntimeError(f"a shard of {tuple(shape)} holds {local.shape[0]} rows on rank {self.rank}; FSDP2's "
                               f"dim-0 chunks of {chunk} rows were expected")
        full[start:start + local.shape[0]].copy_(local)
        return full, offset + _aligned(nbytes)


def _nbytes(value, dtype: torch.dtype | None) -> int:
    return value.numel() * (dtype if dtype is not None and value.is_floating_point() else value.dtype).itemsize


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _one_host(group) -> bool:
    hosts = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return len(set(hosts)) == 1


def _create(path: str, nbytes: int) -> bool:
    """The bucket's file, its pages reserved now (posix_fallocate: a full /dev/shm answers ENOSPC here instead of
    SIGBUS at the first write)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return False
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return True
    except OSError:
        os.unlink(path)
        return False
    finally:
        os.close(fd)


def _all(flag: bool, group) -> bool:
    value = torch.tensor(int(flag))
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value)
