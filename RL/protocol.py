"""`Batch`: the one payload exchanged between the driver and the workers.

Three parts that always index together:
- `tensors`: a TensorDict whose first dimension is the batch (input ids, masks, log-probs, latents padded per sample);
- `non_tensors`: per-sample numpy object arrays (`uid` group ids, raw prompts, PIL images, ragged latent vectors,
  ground truth, per-sample pixel values);
- `meta`: run-wide scalars (temperature, pixel limits, token counts), copied, never indexed.

Every operation returns a new Batch (views where torch/numpy give views) except `pop`, which removes keys from self.
Pickling consolidates the TensorDict into one storage so Ray moves it as a single buffer.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from tensordict import TensorDict

Index = Union[int, slice, torch.Tensor, np.ndarray, Sequence[int]]


def object_array(values: Iterable[Any]) -> np.ndarray:
    """A 1-D object array, even when the values are lists or arrays (numpy would otherwise stack them)."""
    values = list(values)
    array = np.empty(len(values), dtype=object)
    array[:] = values if values else []
    return array


def _as_non_tensor(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype == object:
        return value
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value.astype(object)
    return object_array(value)


class Batch:
    """A batch of samples with tensor, per-sample object and run-wide parts (see the module docstring)."""

    def __init__(self, tensors: Optional[Union[TensorDict, Mapping[str, torch.Tensor]]] = None,
                 non_tensors: Optional[Mapping[str, Any]] = None, meta: Optional[Mapping[str, Any]] = None,
                 batch_size: Optional[int] = None):
        self.non_tensors = {key: _as_non_tensor(value) for key, value in (non_tensors or {}).items()}
        self.meta = dict(meta or {})
        size = self._infer_size(tensors, batch_size)
        if isinstance(tensors, TensorDict):
            self.tensors = tensors if tensors.batch_size == torch.Size([size]) else \
                TensorDict(tensors.to_dict(), batch_size=[size])
        else:
            self.tensors = TensorDict(dict(tensors or {}), batch_size=[size])
        self._check_lengths()

    def _infer_size(self, tensors, batch_size: Optional[int]) -> int:
        if batch_size is not None:
            return batch_size
        if isinstance(tensors, TensorDict) and tensors.batch_dims:
            return tensors.batch_size[0]
        for value in list((tensors or {}).values()) + list(self.non_tensors.values()):
            return len(value)
        return 0

    def _check_lengths(self) -> None:
        for key, value in self.non_tensors.items():
            if len(value) != len(self):
                raise ValueError(f"non-tensor {key!r} has {len(value)} entries, the batch has {len(self)}")
        overlap = set(self.tensors.keys()) & set(self.non_tensors)
        if overlap:
            raise ValueError(f"keys {sorted(overlap)} are both tensors and non-tensors")

    # ---------------------------------------------------------------------------------------------- basics
    def __len__(self) -> int:
        return self.tensors.batch_size[0]

    def keys(self) -> list[str]:
        return list(self.tensors.keys()) + list(self.non_tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors.keys() or key in self.non_tensors

    def __repr__(self) -> str:
        tensors = {key: tuple(value.shape) for key, value in self.tensors.items()}
        return f"Batch(len={len(self)}, tensors={tensors}, non_tensors={list(self.non_tensors)}, meta={self.meta})"

    def _new(self, tensors: TensorDict, non_tensors: Mapping[str, np.ndarray]) -> "Batch":
        return Batch(tensors, non_tensors, dict(self.meta), batch_size=tensors.batch_size[0])

    def __getitem__(self, index: Union[str, Index]) -> Any:
        """`batch["key"]` gives the tensor or object array; an int, slice, index tensor/list or bool mask gives a
        Batch (an int keeps a length-1 Batch so every operation composes; `row(i)` gives a plain dict)."""
        if isinstance(index, str):
            return self.tensors[index] if index in self.tensors.keys() else self.non_tensors[index]
        positions = self._positions(index)
        tensors = self.tensors[torch.as_tensor(positions, dtype=torch.long)] if len(positions) else self.tensors[:0]
        return self._new(tensors, {key: value[positions] for key, value in self.non_tensors.items()})

    def _positions(self, index: Index) -> np.ndarray:
        """Integer positions for any supported index, checked against the batch length."""
        if isinstance(index, (int, np.integer)):
            index = int(index)
            if not -len(self) <= index < len(self):
                raise IndexError(f"index {index} out of range for a batch of {len(self)}")
            return np.array([index % len(self)])
        if isinstance(index, slice):
            return np.arange(len(self))[index]
        positions = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        if positions.dtype == bool:
            if len(positions) != len(self):
                raise IndexError(f"boolean mask of length {len(positions)} for a batch of {len(self)}")
            return np.nonzero(positions)[0]
        positions = positions.astype(np.int64).reshape(-1)
        if len(positions) and (positions.max() >= len(self) or positions.min() < -len(self)):
            raise IndexError(f"index out of range for a batch of {len(self)}")
        return positions % max(len(self), 1)

    def row(self, index: int) -> dict[str, Any]:
        """Sample `index` as a plain dict (tensor rows and objects)."""
        item = {key: value[index] for key, value in self.tensors.items()}
        item.update({key: value[index] for key, value in self.non_tensors.items()})
        return item

    # -------------------------------------------------------------------------------------------- key ops
    def select(self, keys: Iterable[str]) -> "Batch":
        """A Batch with only `keys` (tensor or non-tensor); meta is kept."""
        keys = list(keys)
        missing = [key for key in keys if key not in self]
        if missing:
            raise KeyError(f"keys {missing} not in batch (has {self.keys()})")
        tensor_keys = [key for key in keys if key in self.tensors.keys()]
        return self._new(self.tensors.select(*tensor_keys),
                         {key: self.non_tensors[key] for key in keys if key in self.non_tensors})

    def pop(self, keys: Iterable[str]) -> "Batch":
        """Remove `keys` from this batch and return them as a new Batch (meta copied)."""
        popped = self.select(keys)
        for key in popped.keys():
            if key in self.non_tensors:
                del self.non_tensors[key]
            else:
                del self.tensors[key]
        return popped

    def union(self, other: "Batch") -> "Batch":
        """Keys of both batches (same length); a key in both must hold equal values."""
        if len(self) != len(other):
            raise ValueError(f"union of batches of different lengths: {len(self)} and {len(other)}")
        tensors = self.tensors.clone(recurse=False)
        for key, value in other.tensors.items():
            if key in tensors.keys() and not torch.equal(tensors[key], value):
                raise ValueError(f"union: tensor {key!r} differs between the batches")
            tensors[key] = value
        non_tensors = dict(self.non_tensors)
        for key, value in other.non_tensors.items():
            if key in non_tensors and not _objects_equal(non_tensors[key], value):
                raise ValueError(f"union: non-tensor {key!r} differs between the batches")
            non_tensors[key] = value
        for key, value in other.meta.items():
            if key in self.meta and not _objects_equal(self.meta[key], value):
                raise ValueError(f"union: meta {key!r} differs between the batches")
        return Batch(tensors, non_tensors, {**self.meta, **other.meta}, batch_size=len(self))

    # ------------------------------------------------------------------------------------------- size ops
    def chunk(self, chunks: int) -> list["Batch"]:
        """`chunks` equal parts (one per worker); an uneven split is refused (the config checks make every batch size
        a multiple of the worker count, so this is a bug, never padded over)."""
        if chunks < 1 or len(self) % chunks:
            raise ValueError(f"cannot chunk a batch of {len(self)} into {chunks} equal parts")
        return self.split(len(self) // chunks)

    def split(self, size: int) -> list["Batch"]:
        """Consecutive parts of `size` samples; the last may be shorter."""
        if size < 1:
            raise ValueError(f"split size must be >= 1, got {size}")
        return [self[start:start + size] for start in range(0, len(self), size)]

    @staticmethod
    def concat(batches: Sequence["Batch"]) -> "Batch":
        """Samples of all batches in order; keys must match; meta of the first batch wins."""
        if not batches:
            raise ValueError("concat of an empty list")
        keys = set(batches[0].keys())
        for batch in batches[1:]:
            if set(batch.keys()) != keys:
                raise ValueError(f"concat: keys differ: {sorted(keys)} vs {sorted(batch.keys())}")
        tensors = torch.cat([batch.tensors for batch in batches], dim=0)
        non_tensors = {key: np.concatenate([batch.non_tensors[key] for batch in batches])
                       for key in batches[0].non_tensors}
        meta = {}
        for batch in reversed(batches):
            meta.update(batch.meta)
        return Batch(tensors, non_tensors, meta, batch_size=sum(len(batch) for batch in batches))

    def repeat(self, times: int, interleave: bool = True) -> "Batch":
        """Each sample `times` times: interleaved [a, a, b, b] (rollout groups) or tiled [a, b, a, b]."""
        base = torch.arange(len(self))
        index = base.repeat_interleave(times) if interleave else base.repeat(times)
        return self[index]

    def reorder(self, indices: Union[torch.Tensor, np.ndarray, Sequence[int]]) -> "Batch":
        """The samples in the order `indices` (a permutation); returns a new Batch."""
        positions = self._positions(indices)
        if sorted(positions.tolist()) != list(range(len(self))):
            raise ValueError("reorder needs a permutation of the batch positions; use batch[indices] to select")
        return self[positions]

    # ------------------------------------------------------------------------------------- conversion, I/O
    def to(self, device: Union[str, torch.device]) -> "Batch":
        return Batch(self.tensors.to(device), self.non_tensors, self.meta, batch_size=len(self))

    def to_dict(self) -> dict[str, Any]:
        """Flat {key: tensor | object array}; meta is separate (`Batch.from_dict(d, meta=batch.meta)`)."""
        return {**{key: value for key, value in self.tensors.items()}, **self.non_tensors}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], meta: Optional[Mapping[str, Any]] = None) -> "Batch":
        """Tensors go to `tensors`, everything else (lists, arrays) to per-sample `non_tensors`."""
        tensors = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
        non_tensors = {key: value for key, value in data.items() if not isinstance(value, torch.Tensor)}
        return cls(tensors, non_tensors, meta)

    def __getstate__(self) -> dict[str, Any]:
        tensors = self.tensors
        if len(tensors.keys()) and not tensors.is_consolidated() and not tensors.is_locked:
            tensors = tensors.consolidate()
        return {"tensors": tensors, "non_tensors": self.non_tensors, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.tensors, self.non_tensors, self.meta = state["tensors"], state["non_tensors"], state["meta"]


def _objects_equal(left: Any, right: Any) -> bool:
    if left is right:
        return True
    if isinstance(left, np.ndarray) and isinstance(right, np.ndarray):
        return len(left) == len(right) and all(_objects_equal(a, b) for a, b in zip(left, right))
    if isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor):
        return left.shape == right.shape and torch.equal(left, right)
    try:
        return bool(left == right)
    except (ValueError, RuntimeError, TypeError):
        return False
