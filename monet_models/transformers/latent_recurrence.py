"""The latent recurrence, fast: every `<abs_vis_token_pad>` is fed the final-norm hidden state one position before it.

Those hidden states depend on the latents before them, so one teacher-forced pass cannot produce them. Instead of one
full pass per latent, each sample is cut into chunks that end right before a pad, and round r runs chunk r of every
sample on top of the KV cache of the rounds before it; a pad's latent is the last hidden state of the chunk before it.
Under causal attention a token's output depends only on the tokens before it, so this computes exactly what a full pass
over the final latents computes, in one pass over the tokens (plus one short call per latent), and it keeps the whole
graph: gradients flow through every latent as in the per-latent recurrence (tests/test_sft_recurrence.py).

Hidden spans (Monet stage 2): a token with `hidden[b, l] = j > 0` is visible only to positions whose `view` is j (the
span's own tokens and the latent steps of its block). Chunks also end where the view changes, so one 2D key mask per
round states the rule and no 4D mask is needed. Every call goes through the model's `forward`, so FSDP's hooks run.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from transformers import DynamicCache


@dataclass
class RecurrenceOutput:
    logits: torch.Tensor | None  # (B, L, V) aligned with input_ids; None without compute_logits
    hidden_states: torch.Tensor  # (B, L, D) final post-norm hidden states
    latents: torch.Tensor  # (pads, D) the vectors fed at the pads, row-major
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # decoder layer i's output (B, L, D), 1-based
    image_embeds: torch.Tensor | None = None


@dataclass
class Chunk:
    """One round's work for one sample: its columns in the padded batch and the hidden span it may see."""

    columns: list[int]
    view: int


def base_model(model):
    """The latent model under optional PEFT / FSDP wrapping (FSDP2 keeps the class, PEFT wraps it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def chunk_schedule(input_ids, attention_mask, pad_id: int, view=None) -> list[list[Chunk]]:
    """Per sample, its valid columns cut before every latent pad and wherever the visible span changes."""
    schedule = []
    for b in range(input_ids.shape[0]):
        columns = attention_mask[b].nonzero().flatten().tolist()
        pads = (input_ids[b] == pad_id).tolist()
        views = view[b].tolist() if view is not None else [0] * input_ids.shape[1]
        chunks: list[Chunk] = []
        for index, column in enumerate(columns):
            if not chunks or pads[column] or views[column] != views[columns[index - 1]]:
                chunks.append(Chunk([], views[column]))
            chunks[-1].columns.append(column)
        schedule.append(chunks)
    return schedule


@contextmanager
def captured_layers(model, layers):
    """Collect the outputs of decoder layers `layers` (1-based) on every call while the context is open."""
    blocks = base_model(model).model.language_model.layers
    calls: dict[int, list[torch.Tensor]] = {index: [] for index in layers}
    handles = [blocks[index - 1].register_forward_hook(lambda _m, _i, out, index=index: calls[index].append(out))
               for index in layers]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def image_features(model, pixel_values, image_grid_thw):
    """Flat image features through the model's forward (a one-position language pass), so FSDP hooks run."""
    config = base_model(model).config.text_config
    weight = base_model(model).get_input_embeddings().weight
    dummy = torch.zeros(1, 1, config.hidden_size, dtype=weight.dtype, device=pixel_values.device)
    out = model(inputs_embeds=dummy, position_ids=torch.zeros(3, 1, 1, dtype=torch.long, device=dummy.device),
                pixel_values=pixel_values, image_grid_thw=image_grid_thw, compute_logits=False, latent_mode=True)
    return out.image_embeds


def count_rounds(input_ids, attention_mask, pad_id: int, view=None) -> int:
    """How many rounds `recurrent_latent_forward` runs for this batch (its most chunks in one sample)."""
    schedule = chunk_schedule(input_ids.cpu(), attention_mask.cpu(), pad_id, None if view is None else view.cpu())
    return max(len(chunks) for chunks in schedule)


def recurrent_latent_forward(model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *,
                             image_embeds=None, latents=None, hidden=None, view=None, layers=(),
                             compute_logits: bool = True, checkpoint: bool = False, rounds: int = 0):
    """(RecurrenceOutput, latents): the recurrence over a padded batch (any padding side).

    `latents` given (pads, D): feed those instead of computing them (a teacher-forced pass with the same masks).
    `hidden`/`view` (B, L): hidden spans and what each position sees (module docstring). `layers`: decoder layers whose
    outputs to return. `checkpoint`: recompute each round in backward (activation memory of one pass). `rounds`: run
    at least this many rounds (empty ones at the end), so FSDP ranks make the same calls (`count_rounds`).
    """
    latent_tokens = base_model(model).latent_tokens
    if image_embeds is None and pixel_values is not None:
        image_embeds = image_features(model, pixel_values, image_grid_thw)
    schedule = chunk_schedule(input_ids.cpu(), attention_mask.cpu(), latent_tokens.pad,
                              None if view is None else view.cpu())
    plan = _RoundPlan(model, input_ids, attention_mask, image_grid_thw, image_embeds, hidden, schedule, rounds)
    with captured_layers(model, layers) as calls:
        results, fed = plan.run(latents, compute_logits, checkpoint)
    out = RecurrenceOutput(
        logits=plan.assemble([r.logits for r in results]) if compute_logits else None,
        hidden_states=plan.assemble([r.hidden for r in results]), latents=fed,
        layers={index: plan.assemble(values) for index, values in calls.items()}, image_embeds=image_embeds)
    return out, fed


@dataclass
class _RoundResult:
    hidden: torch.Tensor
    logits: torch.Tensor | None
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class _RoundPlan:
    """The padded tensors of every round: chunk ids, mRoPE positions, key masks; then running and reassembling."""

    def __init__(self, model, input_ids, attention_mask, image_grid_thw, image_embeds, hidden, schedule, rounds):
        self.model, self.schedule, self.device = model, schedule, input_ids.device
        base = base_model(model)
        self.pad_id, self.filler = base.latent_tokens.pad, base.latent_tokens.pad_token
        self.input_ids, self.image_embeds = input_ids, image_embeds
        self.positions, _ = base.mrope_positions(input_ids, attention_mask, image_grid_thw)
        self.hidden = hidden if hidden is not None else torch.zeros_like(input_ids)
        flat = input_ids.flatten()
        self.image_index = ((flat == base.config.image_token_id).cumsum(0) - 1).view_as(input_ids)
        self.pad_index = ((flat == self.pad_id).cumsum(0) - 1).view_as(input_ids)
        self.rounds = max(rounds, max(len(chunks) for chunks in schedule))
        width = [max([len(c[r].columns) if r < len(c) else 1 for c in schedule]) for r in range(self.rounds)]
        self.columns = [self._columns(r, w) for r, w in enumerate(width)]  # (B, c_r), -1 = filler
        self.kv_columns = torch.cat(self.columns, dim=1)

    def _columns(self, r: int, width: int) -> torch.Tensor:
        rows = [(c[r].columns if r < len(c) else []) for c in self.schedule]
        return torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long, device=self.device)

    def _views(self, r: int) -> torch.Tensor:
        return torch.tensor([c[r].view if r < len(c) else 0 for c in self.schedule], device=self.device)

    def run(self, latents, compute_logits: bool, checkpoint: bool):
        results: list[_RoundResult] = []
        fed: dict[int, torch.Tensor] = {}
        for r in range(self.rounds):
            ids, positions, mask, images, chunk_latents = self._inputs(r, results, latents, fed)
            prior_keys = [k for result in results for k in result.keys]
            prior_values = [v for result in results for v in result.values]
            call = _RoundCall(self.model, len(results), compute_logits)
            args = (ids, positions, mask, images, chunk_latents, *prior_keys, *prior_values)
            outputs = activation_checkpoint(call, *args, use_reentrant=False) if checkpoint else call(*args)
            results.append(call.unpack(outputs))
        order = sorted(fed)
        fed_tensor = torch.stack([fed[i] for i in order]) if order else self._empty()
        return results, fed_tensor

    def _empty(self) -> torch.Tensor:
        width = base_model(self.model).config.text_config.hidden_size
        return torch.zeros(0, width, device=self.device)

    def _inputs(self, r: int, results: list[_RoundResult], latents, fed: dict):
        """Round r's ids, positions (3, B, c), key mask (B, kv), image features and latents of its pads."""
        columns = self.columns[r]
        real = columns >= 0
        safe = columns.clamp(min=0)
        ids = torch.where(real, self.input_ids.gather(1, safe), torch.full_like(safe, self.filler))
        positions = torch.where(real[None], self.positions.gather(2, safe[None].expand(3, -1, -1)), 0)
        kv = self.kv_columns[:, :sum(c.shape[1] for c in self.columns[:r + 1])]
        key_hidden = torch.where(kv >= 0, self.hidden.gather(1, kv.clamp(min=0)), 0)
        mask = (kv >= 0) & ((key_hidden == 0) | (key_hidden == self._views(r)[:, None]))
        images = None
        if self.image_embeds is not None:  # an empty selection too: the same graph on every rank (see _latents)
            image_slots = ids == base_model(self.model).config.image_token_id
            images = self.image_embeds[self.image_index.gather(1, safe)[image_slots]]
        return ids, positions, mask.long(), images, self._latents(r, ids, safe, results, latents, fed)

    def _latents(self, r: int, ids, safe, results: list[_RoundResult], latents, fed: dict):
        """The latents of round r's pads (one per sample at most: a pad always starts its chunk)."""
        rows = (ids[:, 0] == self.pad_id).nonzero().flatten().tolist()
        if not rows:
            # An empty slice of the source still links this round to it, so every FSDP rank's backward graph has the
            # same shape and runs its all-gathers in the same order, whichever rank's rows hold the pads.
            if latents is not None:
                return latents[:0]
            return results[r - 1].hidden[:0, -1] if r else None
        vectors = []
        for b in rows:
            index = int(self.pad_index[b, safe[b, 0]])
            if latents is not None:
                vector = latents[index]
            else:  # the last hidden state of this sample's previous chunk
                vector = results[r - 1].hidden[b, len(self.schedule[b][r - 1].columns) - 1]
            fed[index] = vector
            vectors.append(vector)
        return torch.stack(vectors)

    def assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """(B, L, ...) from per-round (B, c_r, ...) outputs; padding columns are zero."""
        stacked = torch.cat(parts, dim=1)
        batch, length = self.input_ids.shape
        slot = torch.zeros(batch, length, dtype=torch.long, device=self.device)
        valid = torch.zeros(batch, length, dtype=torch.bool, device=self.device)
        rows, kv = (self.kv_columns >= 0).nonzero(as_tuple=True)
        slot[rows, self.kv_columns[rows, kv]] = kv
        valid[rows, self.kv_columns[rows, kv]] = True
        gathered = stacked[torch.arange(batch, device=self.device)[:, None], slot]
        return gathered * valid.view(batch, length, *[1] * (gathered.dim() - 2)).to(gathered.dtype)


class _RoundCall:
    """One round as a pure function of its inputs (the cache is rebuilt inside), so it can be recomputed."""

    def __init__(self, model, prior_rounds: int, compute_logits: bool):
        self.model, self.prior_rounds, self.compute_logits = model, prior_rounds, compute_logits
        self.layers = base_model(model).config.text_config.num_hidden_layers

    def __call__(self, ids, positions, mask, images, latents, *prior):
        keys, values = prior[:len(prior) // 2], prior[len(prior) // 2:]
        cache = DynamicCache(config=base_model(self.model).config.text_config)
        width = ids.shape[1]
        if self.prior_rounds:
            for layer in range(self.layers):
                cache.update(torch.cat(keys[layer::self.layers], dim=2), torch.cat(values[layer::self.layers], dim=2),
                             layer)
        with _without_layer_checkpointing(self.model):  # also when backward recomputes this round
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, image_embeds=images, latent_embeds=latents,
                             compute_logits=self.compute_logits, latent_mode=True)
        new_keys = [cache.layers[layer].keys[:, :, -width:].clone() for layer in range(self.layers)]
        new_values = [cache.layers[layer].values[:, :, -width:].clone() for layer in range(self.layers)]
        logits = () if out.logits is None else (out.logits,)
        return (out.hidden_states, *logits, *new_keys, *new_values)

    def unpack(self, outputs) -> _RoundResult:
        hidden, rest = outputs[0], outputs[1:]
        logits = None
        if self.compute_logits:
            logits, rest = rest[0], rest[1:]
        return _RoundResult(hidden, logits, list(rest[:self.layers]), list(rest[self.layers:]))


@contextmanager
def _without_layer_checkpointing(model):
    """transformers drops the KV cache inside checkpointed layers; the rounds checkpoint themselves instead."""
    base = base_model(model)
    enabled = getattr(base, "is_gradient_checkpointing", False)
    if enabled:
        base.gradient_checkpointing_disable()
    try:
        yield
    finally:
        if enabled:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


__all__ = ["RecurrenceOutput", "base_model", "captured_layers", "chunk_schedule", "count_rounds", "image_features",
           "recurrent_latent_forward"]
