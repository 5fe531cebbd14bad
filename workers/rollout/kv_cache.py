"""A `DynamicCache` whose layers reserve room for the response at prefill.

The stock `DynamicLayer` concatenates the whole cache with each new token (an O(length) copy per layer per step);
here a decode step writes one column of a preallocated buffer and exposes a view. Batch repeat (n samples per
prompt) and row selection (compaction) keep working, so the engine uses it exactly like a `DynamicCache`.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = reserve
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self._keys is None or self._length + new > self._keys.shape[-2]:
            self._grow(self._length + new + self.reserve, key_states, value_states)
        self._keys[:, :, self._length:self._length + new] = key_states
        self._values[:, :, self._length:self._length + new] = value_states
        self._length += new
        self._expose()
        return self.keys, self.values

    def _grow(self, capacity: int, key_states, value_states) -> None:
        keys = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[-1])
        values = value_states.new_empty(*value_states.shape[:2], capacity, value_states.shape[-1])
        if self._keys is not None:
            keys[:, :, :self._length] = self._keys[:, :, :self._length]
            values[:, :, :self._length] = self._values[:, :, :self._length]
        self._keys, self._values = keys, values

    def _expose(self) -> None:
        self.keys = self._keys[:, :, :self._length]
        self.values = self._values[:, :, :self._length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._length:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._length:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._expose()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the rollout cache only grows")

    def reset(self) -> None:
        super().reset()
        self._keys = self._values = None
        self._length = 0


class RolloutCache(DynamicCache):
    """DynamicCache with `PreallocatedLayer`s when every layer is full attention (else the stock layers)."""

    def __init__(self, config, reserve: int):
        super().__init__(config=config)
        if all(type(layer) is DynamicLayer for layer in self.layers):
            self.layers = [PreallocatedLayer(reserve) for _ in self.layers]
