"""The weight sync's shared-memory bucket (workers/actor/host_bucket.py) on a gloo world of two CPU processes: full
tensors equal to the originals whatever the row split (uneven, a rank with no rows), cast on the way, replicated
tensors handed to the caller's gather, no file left behind, and no bucket (on every rank) when /dev/shm cannot
hold it."""
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist


def _rank(rank: int, port: int, folder: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from workers.actor.host_bucket import SHM_DIR, HostBucket, bucket_bytes_needed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        generator = torch.Generator().manual_seed(0)  # the same full tensors on both ranks
        full = {"even": torch.randn(4, 3, generator=generator), "uneven": torch.randn(5, 3, generator=generator),
                "one_row": torch.randn(1, 6, generator=generator), "ids": torch.arange(7)}
        entries = [(name, distribute_tensor(value, mesh, [Shard(0)])) for name, value in full.items()]
        entries.append(("buffer", torch.ones(2)))  # a plain (replicated) tensor
        before = set(os.listdir(SHM_DIR))
        too_big = HostBucket.open(mesh.get_group(), 1 << 50)
        bucket = HostBucket.open(mesh.get_group(), bucket_bytes_needed([entries], torch.bfloat16))
        gathered = {name: tensor.clone() for name, tensor in bucket.gather(  # a replicated tensor: the caller's gather
            entries, torch.bfloat16, lambda value: value.to(torch.bfloat16))}
        expected = {**{name: value.to(torch.bfloat16) if value.is_floating_point() else value
                       for name, value in full.items()}, "buffer": torch.ones(2, dtype=torch.bfloat16)}
        result = {"too_big_is_none": too_big is None, "shared": bucket.buffer.is_shared(),
                  "equal": {name: torch.equal(gathered[name], expected[name]) for name in expected},
                  "dtypes": {name: str(tensor.dtype) for name, tensor in gathered.items()},
                  "new_files": sorted(set(os.listdir(SHM_DIR)) - before)}
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_host_bucket_gathers_every_split_and_leaves_nothing(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_rank, args=(port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["too_big_is_none"] and result["shared"]
        assert all(result["equal"].values()), result["equal"]
        assert result["dtypes"]["uneven"] == "torch.bfloat16" and result["dtypes"]["ids"] == "torch.int64"
        assert result["new_files"] == []
