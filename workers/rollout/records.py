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
        """Row -> (num_latents, D) fp32 on CPU, in step order (latents past a row's length are dropped). Each row's
        tensor is stacked from its recorded vectors, one copy each: one large concatenation would land in freshly
        mapped memory every step (page faults cost 5x the copy at 73 MB), while row-sized tensors reuse the heap."""
        if not self._latents:
            return {}
        chunks = [vectors.cpu() for _, _, vectors in self._latents]
        rows = torch.cat([r for r, _, _ in self._latents]).cpu()
        steps = torch.cat([torch.full((len(r),), s, dtype=torch.long) for r, s, _ in self._latents])
        chunk_of = torch.cat([torch.full((len(r),), c, dtype=torch.long) for c, (r, _, _) in enumerate(self._latents)])
        index_in_chunk = torch.cat([torch.arange(len(r)) for r, _, _ in self._latents])
        kept = (steps < self.lengths.cpu()[rows]).nonzero().flatten()
        kept = kept[torch.argsort(rows[kept] * self.max_new_tokens + steps[kept], stable=True)]
        per_row: dict[int, list[torch.Tensor]] = {}
        for row, chunk, index in zip(rows[kept].tolist(), chunk_of[kept].tolist(), index_in_chunk[kept].tolist()):
            per_row.setdefault(row, []).append(chunks[chunk][index])
        return {row: torch.stack(vectors) for row, vectors in per_row.items()}

    def to_samples(self, n: int, prompt_offset: int, layout: LatentLayout) -> list[RolloutSample]:
        latents = self.latents_per_row()
        tokens, log_probs = self.tokens.cpu(), self.log_probs.cpu()
        lengths, stopped, open_block = self.lengths.tolist(), self.stopped.tolist(), self.open_block.tolist()
        layouts = block_layouts(tokens, lengths, layout, open_block)
        return [RolloutSample(
            prompt_index=prompt_offset + row // n, sample_index=row % n, response_ids=tokens[row, :length].clone(),
            response_mask=mask, token_log_probs=log_probs[row, :length].clone(), latents=latents.get(row),
            block_positions=blocks, truncated_block=open_block[row], finish_reason="eos" if stopped[row] else "length",
        ) for row, (length, (blocks, mask)) in enumerate(zip(lengths, layouts))]


def block_layout(ids: torch.Tensor, layout: LatentLayout, truncated: bool):
    """(block_positions, response_mask) of one response: every block but a truncated last one holds exactly K
    latents."""
    return block_layouts(ids[None], [len(ids)], layout, [truncated])[0]


def block_layouts(tokens: torch.Tensor, lengths: list[int], layout: LatentLayout, truncated: list[bool]) -> list:
    """`block_layout` of each row of `tokens` (row r's response is its first lengths[r] tokens), computed for all
    rows at once: a loop of small tensor operations per row cost 20x copying the latents themselves at 512 rows.
    The mask drops the forced end tokens and, in a truncated row, everything after its last block's start (the open
    block's latents leave the latent loss)."""
    ids = layout.tokens
    positions = torch.arange(tokens.shape[1])
    valid = positions < torch.tensor(lengths)[:, None]
    starts = (tokens == ids.start) & valid
    last = torch.where(starts, positions, -1).amax(dim=1)
    open_rows = torch.tensor(truncated) & (last >= 0)
    after_last = (positions > last[:, None]) & open_rows[:, None]
    mask = (tokens != ids.end).long().masked_fill_(after_last, 0)
    open_sizes = ((tokens == ids.pad) & after_last & valid).sum(dim=1).tolist()
    start_lists = [[] for _ in lengths]
    for row, column in starts.nonzero().tolist():
        start_lists[row].append(column)
    layouts = []
    for row, (length, row_starts) in enumerate(zip(lengths, start_lists)):
        blocks = [(start, layout.latent_size) for start in row_starts]
        if open_rows[row]:
            blocks[-1] = (row_starts[-1], open_sizes[row])
        layouts.append((blocks, mask[row, :length].clone()))
    return layouts
