"""The state the latent model and the latent logits processor share inside one vLLM worker process.

vLLM runs the model forward and then the logits processors in the same worker process, once per step, with the
requests in the same (persistent batch) order. Each step the model leaves here the final-norm hidden state of every
request's last scheduled position and that position's KV-cache slot. When the processor places an
`<abs_vis_token_pad>` for a request, it writes the latent z = h + noise into the request's row of a side buffer,
tagged with the slot of the position it follows. Next time the request is scheduled, the model finds the pad among
its input ids, looks up the row tagged with the previous position's slot and feeds that latent instead of the pad's
embedding. Slots tell requests apart whatever the batch order (prefix caching off, no preemption).

A request has at most one latent waiting: a pad is placed only after the forward that fed the previous one. So the
buffer holds one row per request the batch can hold (`max_num_seqs`), whatever K, the response length or the KV
cache size: `latent_buffer_bytes` is its size, allocated once at the first latent and freed when the engine sleeps.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from monet_models.latent_tokens import LatentTokens

FREE = -1  # the slot tag of a row that holds no waiting latent


def latent_buffer_bytes(max_num_seqs: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of the latent side buffer of one engine: a (max_num_seqs, hidden_size) table in the model's dtype and
    its int64 slot tags. The memory planner adds it to the engine's footprint (it lies outside vLLM's own budget)."""
    return max_num_seqs * (hidden_size * dtype.itemsize + torch.int64.itemsize)


class LatentChannel:
    _current: ClassVar["LatentChannel | None"] = None

    def __init__(self, tokens: LatentTokens, real_vocab_size: int, hidden_size: int, dtype: torch.dtype,
                 max_num_seqs: int):
        self.tokens = tokens
        self.real_vocab_size = real_vocab_size
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.max_num_seqs = max_num_seqs
        self.hidden: torch.Tensor | None = None  # (num_reqs, D) of the last forward, in batch order
        self.last_slots: torch.Tensor | None = None  # (num_reqs,) KV slot of each request's last position
        self.buffer: torch.Tensor | None = None  # (max_num_seqs, D): each request's waiting latent
        self.tags: torch.Tensor | None = None  # (max_num_seqs,): slot the waiting latent follows, FREE if none
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))

    @classmethod
    def publish(cls, channel: "LatentChannel") -> None:
        """Called by the model once per worker process (one model per process)."""
        cls._current = channel

    @classmethod
    def current(cls) -> "LatentChannel":
        if cls._current is None:
            raise RuntimeError("no latent model in this vLLM process: start the engine with "
                               "hf_overrides={'architectures': ['LatentQwen2_5_VLForConditionalGeneration']}")
        return cls._current

    # ------------------------------------------------------------------------------------------ request rows
    def acquire(self) -> int:
        """A row for a request entering the batch (the logits processor calls it once per request)."""
        if not self._free_rows:
            raise RuntimeError(f"more than max_num_seqs={self.max_num_seqs} latent requests at once")
        return self._free_rows.pop()

    def release(self, row: int) -> None:
        """The request left the batch: a latent it never fed (a block cut by the length limit) is dropped."""
        if self.tags is not None:
            self.tags[row] = FREE
        self._free_rows.append(row)

    # -------------------------------------------------------------------------------------------- latents
    def write(self, rows: torch.Tensor, slots: torch.Tensor, latents: torch.Tensor) -> None:
        """Leave `latents` for the requests at `rows`, to feed after the positions at KV `slots`."""
        if self.buffer is None:
            self.buffer = torch.zeros(self.max_num_seqs, self.hidden_size, dtype=self.dtype, device=latents.device)
            self.tags = torch.full((self.max_num_seqs,), FREE, dtype=torch.long, device=latents.device)
        rows = rows.to(self.buffer.device)
        self.buffer[rows] = latents.to(self.dtype)
        self.tags[rows] = slots.to(self.tags.device, torch.long)

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """The latents waiting after the positions at `slots` (one per pad input); they are consumed."""
        hits = None if self.tags is None else slots.to(self.tags.device, torch.long)[:, None] == self.tags[None, :]
        if hits is None or not bool(hits.any(dim=1).all()):
            raise RuntimeError("a <abs_vis_token_pad> input has no recorded latent: pads must be placed by the "
                               "latent logits processor, never given in a prompt")
        rows = hits.int().argmax(dim=1)
        self.tags[rows] = FREE
        return self.buffer[rows]

    @property
    def allocated_bytes(self) -> int:
        """What the buffer holds now (0 before the first latent and after `free`)."""
        if self.buffer is None:
            return 0
        return self.buffer.numel() * self.buffer.element_size() + self.tags.numel() * self.tags.element_size()

    def free(self) -> None:
        """Give the buffer (and the last step's references into vLLM's tensors) back, e.g. when the engine sleeps.
        Only between `generate` calls: a waiting latent would be lost."""
        self.buffer = self.tags = self.hidden = self.last_slots = None
