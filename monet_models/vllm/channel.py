"""The state the latent model and the latent logits processor share inside one vLLM worker process.

vLLM runs the model forward and then the logits processors in the same worker process, once per step, with the
requests in the same (persistent batch) order. Each step the model leaves here the final-norm hidden state of every
request's last scheduled position and that position's KV-cache slot. When the processor places an
`<abs_vis_token_pad>` for a request, it writes the latent z = h + noise into a side buffer at that slot. Next step,
the model finds the pad among its input ids and feeds buffer[slot of the previous position] instead of the pad's
embedding. Slots are stable while a request lives (prefix caching off, no preemption), and they tell apart
requests whose positions coincide, whatever the batch order.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from monet_models.latent_tokens import LatentTokens


class LatentChannel:
    _current: ClassVar["LatentChannel | None"] = None

    def __init__(self, tokens: LatentTokens, real_vocab_size: int, hidden_size: int, dtype: torch.dtype):
        self.tokens = tokens
        self.real_vocab_size = real_vocab_size
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.hidden: torch.Tensor | None = None  # (num_reqs, D) of the last forward, in batch order
        self.last_slots: torch.Tensor | None = None  # (num_reqs,) KV slot of each request's last position
        self.buffer: torch.Tensor | None = None  # (slots, D): latent to feed after the position at a slot

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

    def write(self, slots: torch.Tensor, latents: torch.Tensor) -> None:
        """Store the latents to feed after the positions at `slots` (the buffer grows as slots appear)."""
        needed = int(slots.max()) + 1
        if self.buffer is None or self.buffer.shape[0] < needed:
            grown = torch.zeros(max(needed, 2 * (0 if self.buffer is None else self.buffer.shape[0])),
                                self.hidden_size, dtype=self.dtype, device=latents.device)
            if self.buffer is not None:
                grown[:self.buffer.shape[0]] = self.buffer
            self.buffer = grown
        self.buffer[slots.to(self.buffer.device)] = latents.to(self.dtype)

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        if self.buffer is None or int(slots.max()) >= self.buffer.shape[0]:
            raise RuntimeError("a <abs_vis_token_pad> input has no recorded latent: pads must be placed by the "
                               "latent logits processor, never given in a prompt")
        return self.buffer[slots]
