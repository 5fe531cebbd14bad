"""What a decode loop writes down, and how it becomes `RolloutSample`s.

Buffers are indexed by the original row (prompt-major: row = prompt * n + sample), so compacting the live batch
never reorders results. Latents are kept as (row, step, vector) triples only for the steps that fed one, because
a dense (rows, steps, D) buffer would not fit for real model sizes.
"""
from __future__ import annotations

import torch

from workers.rollout.base import RolloutSample
from workers.rollout.latent_state import LatentLayout


class RolloutRecorder:
    def __init__(self, num_rows: int, max_new_tokens: int, pad_id: int, device):
        self.max_new_tokens = max_new_tokens
        self.tokens = torch.full((num_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.log_probs = torch.zeros(num_rows, max_new_tokens, dtype=torch.float32, device=device)
        self.lengths = torch.full((num_rows,), max_new_tokens, dtype=torch.long, device=device)
        self.stopped = torch.zeros(num_rows, dtype=torch.bool, device=device)
        self.open_block = torch.zeros(num_rows, dtype=torch.bool, device=device)
        self._latents: list[tuple[torch.Tensor, int, torch.Tensor]] = []

    def record_step(self, rows: torch.Tensor, step: int, tokens: torch.Tensor, log_probs: torch.Tensor) -> None:
        self.tokens[rows, step] = tokens
        self.log_probs[rows, step] = log_probs

    def record_latents(self, rows: torch.Tensor, step: int, vectors: torch.Tensor) -> None:
        self._latents.append((rows, step, vectors.float()))

    def record_end(self, rows: torch.Tensor, lengths: torch.Tensor, stopped: torch.Tensor, open_block: torch.Tensor):
        """Final state of rows leaving the batch (finished, or all rows at the end of decoding)."""
        self.lengths[rows] = lengths
        self.stopped[rows] = stopped
        self.open_block[rows] = open_block & ~stopped

    def latents_per_row(self) -> dict[int, torch.Tensor]:
        """Row -> (num_latents, D) fp32 on CPU, in step order (latents past a row's length are dropped)."""
        if not self._latents:
            return {}
        rows = torch.cat([r for r, _, _ in self._latents]).cpu()
        steps = torch.cat([torch.full((len(r),), s, dtype=torch.long) for r, s, _ in self._latents])
        vectors = torch.cat([v for _, _, v in self._latents]).cpu()
        keep = steps < self.lengths.cpu()[rows]
        rows, steps, vectors = rows[keep], steps[keep], vectors[keep]
        order = torch.argsort(rows * self.max_new_tokens + steps)
        rows, vectors = rows[order], vectors[order]
        unique, counts = torch.unique_consecutive(rows, return_counts=True)
        return dict(zip(unique.tolist(), torch.split(vectors, counts.tolist())))

    def to_samples(self, n: int, prompt_offset: int, layout: LatentLayout) -> list[RolloutSample]:
        latents = self.latents_per_row()
        tokens, log_probs = self.tokens.cpu(), self.log_probs.cpu()
        lengths, stopped, open_block = self.lengths.tolist(), self.stopped.tolist(), self.open_block.tolist()
        samples = []
        for row, length in enumerate(lengths):
            ids = tokens[row, :length].clone()
            blocks, mask = block_layout(ids, layout, open_block[row])
            samples.append(RolloutSample(
                prompt_index=prompt_offset + row // n, sample_index=row % n, response_ids=ids, response_mask=mask,
                token_log_probs=log_probs[row, :length].clone(), latents=latents.get(row),
                block_positions=blocks, truncated_block=open_block[row],
                finish_reason="eos" if stopped[row] else "length",
            ))
        return samples


def block_layout(ids: torch.Tensor, layout: LatentLayout, truncated: bool):
    """(block_positions, response_mask): every block but a truncated last one holds exactly K latents."""
    tokens = layout.tokens
    starts = (ids == tokens.start).nonzero().flatten().tolist()
    blocks = [(s, layout.latent_size) for s in starts]
    mask = torch.ones_like(ids)
    mask[ids == tokens.end] = 0  # forced, not a policy decision
    if truncated and starts:
        last = starts[-1]
        blocks[-1] = (last, int((ids[last + 1:] == tokens.pad).sum()))
        mask[last + 1:] = 0  # the open block's latents leave the latent loss
    return blocks, mask
