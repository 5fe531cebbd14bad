"""Batch: every operation, with round trips."""
import pickle

import numpy as np
import pytest
import torch

from RL.protocol import Batch, object_array


def make(n: int = 6) -> Batch:
    return Batch(
        {"ids": torch.arange(n * 3).reshape(n, 3), "score": torch.arange(n, dtype=torch.float32)},
        {"uid": [f"u{i}" for i in range(n)], "latents": [torch.full((i, 2), float(i)) for i in range(n)],
         "images": [[i] * 2 for i in range(n)]},
        {"temperature": 0.5},
    )


def rows(batch: Batch) -> list[str]:
    return list(batch.non_tensors["uid"])


def same(left: Batch, right: Batch) -> bool:
    if set(left.keys()) != set(right.keys()) or len(left) != len(right):
        return False
    tensors = all(torch.equal(left.tensors[key], right.tensors[key]) for key in left.tensors.keys())
    objects = all(
        all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            for a, b in zip(left.non_tensors[key], right.non_tensors[key]))
        for key in left.non_tensors)
    return tensors and objects and left.meta == right.meta


def test_construction_len_and_lengths_checked():
    batch = make()
    assert len(batch) == 6
    assert batch.non_tensors["images"].shape == (6,)  # nested lists stay one object per sample
    assert batch["ids"].shape == (6, 3) and batch["uid"][2] == "u2"
    with pytest.raises(ValueError, match="uid"):
        Batch({"ids": torch.zeros(3, 2)}, {"uid": ["a", "b"]})
    assert len(Batch(non_tensors={"uid": ["a", "b"]})) == 2
    assert len(Batch()) == 0


def test_getitem_int_slice_tensor_mask():
    batch = make()
    assert rows(batch[1]) == ["u1"] and len(batch[-1]) == 1 and rows(batch[-1]) == ["u5"]
    assert rows(batch[1:4]) == ["u1", "u2", "u3"]
    picked = batch[torch.tensor([5, 0, 5])]
    assert rows(picked) == ["u5", "u0", "u5"]
    assert torch.equal(picked["score"], torch.tensor([5.0, 0.0, 5.0]))
    assert rows(batch[[1, 2]]) == ["u1", "u2"]
    mask = torch.tensor([True, False, True, False, False, True])
    assert rows(batch[mask]) == ["u0", "u2", "u5"]
    assert torch.equal(batch[3].row(0)["latents"], torch.full((3, 2), 3.0))
    assert batch[2:2].tensors.batch_size[0] == 0
    with pytest.raises(IndexError):
        batch[6]
    with pytest.raises(IndexError):
        batch[torch.tensor([7])]


def test_select_pop_union():
    batch = make()
    selected = batch.select(["ids", "uid"])
    assert set(selected.keys()) == {"ids", "uid"} and selected.meta == {"temperature": 0.5}
    with pytest.raises(KeyError, match="nope"):
        batch.select(["nope"])
    popped = batch.pop(["score", "latents"])
    assert set(popped.keys()) == {"score", "latents"}
    assert set(batch.keys()) == {"ids", "uid", "images"}
    merged = batch.union(popped)
    assert same(merged, make())
    with pytest.raises(ValueError, match="score"):
        merged.union(Batch({"score": torch.zeros(6)}))
    with pytest.raises(ValueError, match="lengths"):
        merged.union(make(3))
    with pytest.raises(ValueError, match="meta"):
        merged.union(Batch({"score": merged["score"]}, meta={"temperature": 1.0}))


def test_chunk_concat_identity_and_uneven_chunk_refused():
    batch = make()
    parts = batch.chunk(3)
    assert [len(part) for part in parts] == [2, 2, 2]
    assert same(Batch.concat(parts), batch)
    with pytest.raises(ValueError, match="into 4 equal parts"):
        batch.chunk(4)


def test_split_sizes_and_concat_key_check():
    batch = make()
    assert [len(part) for part in batch.split(4)] == [4, 2]
    assert same(Batch.concat(batch.split(4)), batch)
    with pytest.raises(ValueError, match="keys differ"):
        Batch.concat([batch, batch.select(["ids"])])


def test_repeat_interleave_and_tile_layout():
    batch = make(3)
    assert rows(batch.repeat(2)) == ["u0", "u0", "u1", "u1", "u2", "u2"]
    assert rows(batch.repeat(2, interleave=False)) == ["u0", "u1", "u2", "u0", "u1", "u2"]
    repeated = batch.repeat(2)
    assert torch.equal(repeated["ids"][1], batch["ids"][0])
    assert torch.equal(repeated["latents"][3], batch["latents"][1])


def test_reorder_round_trip():
    batch = make()
    order = torch.tensor([3, 1, 5, 0, 4, 2])
    shuffled = batch.reorder(order)
    assert rows(shuffled) == ["u3", "u1", "u5", "u0", "u4", "u2"]
    assert same(shuffled.reorder(torch.argsort(order)), batch)
    with pytest.raises(ValueError, match="permutation"):
        batch.reorder([0, 0, 1, 2, 3, 4])


def test_dict_round_trip():
    batch = make()
    data = batch.to_dict()
    assert isinstance(data["ids"], torch.Tensor) and isinstance(data["uid"], np.ndarray)
    assert same(Batch.from_dict(data, meta=batch.meta), batch)


def test_pickle_is_consolidated_and_round_trips():
    batch = make()
    batch.tensors["big"] = torch.randn(6, 4096)
    restored = pickle.loads(pickle.dumps(batch))
    assert same(restored, batch)
    assert restored.tensors.is_consolidated()
    restored.tensors["new"] = torch.zeros(6)  # still an ordinary, writable batch
    assert "new" in restored


def test_object_array_keeps_ragged_values():
    array = object_array([[1, 2], [3, 4]])
    assert array.shape == (2,) and array[0] == [1, 2]
