"""Turn a batch of rollouts into the latent-aware model's inputs, padded or packed (padding-free), and cut it into
micro-batches of a fixed number of samples or of a token budget (dynamic batching)."""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from algorithms.entropy import next_token_entropy
from monet_models.transformers.log_probs import latent_means, next_token_log_probs, with_latent_densities
from monet_models.transformers.packing import pack, unpack
from workers.actor.fsdp import device_type


def _cat(values):
    present = [torch.as_tensor(v) for v in values if v is not None and len(v)]
    return torch.cat(present, dim=0) if present else None


def model_inputs(batch, device) -> dict:
    """input_ids, attention_mask, pixel_values, image_grid_thw and latent_embeds for one micro-batch."""
    non = batch.non_tensors
    inputs = {
        "input_ids": batch.tensors["input_ids"].to(device),
        "attention_mask": batch.tensors["attention_mask"].to(device),
        "pixel_values": _cat(non["pixel_values"]),
        "image_grid_thw": _cat(non["image_grid_thw"]),
        "latent_embeds": _cat(non["latents"]),
    }
    for key in ("pixel_values", "image_grid_thw", "latent_embeds"):
        if inputs[key] is not None:
            inputs[key] = inputs[key].to(device)
    return inputs


def position_log_probs(module, inputs: dict, temperature: float, sigma: float, scale_by_dim: bool,
                       padding_free: bool, chunk_size: int = 0) -> torch.Tensor:
    """(B, L) log-likelihood of every position under `module` (tokens at temperature, latents as Gaussians)."""
    return position_scores(module, inputs, temperature, sigma, scale_by_dim, padding_free, chunk_size)[0]


def position_scores(module, inputs: dict, temperature: float, sigma: float, scale_by_dim: bool,
                    padding_free: bool, chunk_size: int = 0, entropy: bool = False, rows_head=None,
                    wanted: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """`position_log_probs`, and the (latents, D) fp32 means of the latent steps in the order they were recorded
    (what the exact latent KL to the reference is computed from); with `entropy`, a third (B, L) tensor: the
    next-token entropy that produced each position (`algorithms.entropy`; meaningful at text positions only); with
    `rows_head`, a last output: `rows_head(hidden, lm_head)` of the final hidden states that predict the `wanted`
    positions ((B, L) bool over the input positions, response tokens only), one row each in (sample, position)
    order whatever the layout, of any shape (self-evolution's full-vocabulary KL: one forward gives it and the loss).

    The token log-probs come from the model's forward through `next_token_log_probs` as its head, `chunk_size`
    positions at a time (`worker.actor.logprob_chunk_size`): the full (tokens x vocab) logits never exist. The
    entropy is computed in the same head, chunk by chunk (a second lm_head product per chunk).
    """
    pad_id, latents = _latent_pad_id(module), inputs["latent_embeds"]
    ids, common, keep, wanted = forward_args(unwrapped(module), inputs, padding_free, wanted)
    head = partial(next_token_log_probs, input_ids=ids, temperature=temperature, chunk_size=chunk_size)
    if entropy:
        head = partial(_with_entropy, head, temperature=temperature, chunk_size=chunk_size)
    if rows_head is not None:
        head = partial(_with_rows, head, rows_head, rows=wanted[:, 1:].reshape(-1))
    out = module(input_ids=ids, head=head, latent_mode=True, **common)
    output, *rows = out.head_output if rows_head is not None else (out.head_output,)
    text = (output[0] if entropy else output).view(ids.shape[0], -1)
    values = with_latent_densities(text, out.hidden_states, ids, latents, pad_id, sigma, scale_by_dim)
    scores = [values, latent_means(out.hidden_states, ids, pad_id)]
    if entropy:
        scores.append(torch.nn.functional.pad(output[1].view(ids.shape[0], -1), (1, 0)))
    if padding_free:  # back to the padded layout; the means are per latent step, in order, either way
        scores = [unpack(value, keep) if index != 1 else value for index, value in enumerate(scores)]
    return tuple(scores + rows)


def position_rows(module, inputs: dict, padding_free: bool, rows_head, wanted: torch.Tensor) -> torch.Tensor:
    """`rows_head(hidden, lm_head)` at the `wanted` positions alone (`position_scores`' last output without its
    token log-probs): what a pass that needs only the full-vocabulary rows runs (self-evolution's reference)."""
    ids, common, _, wanted = forward_args(unwrapped(module), inputs, padding_free, wanted)
    head = partial(_rows, rows_head, rows=wanted[:, 1:].reshape(-1))
    return module(input_ids=ids, head=head, latent_mode=True, **common).head_output


def forward_args(model, inputs: dict, padding_free: bool, wanted: torch.Tensor | None = None) -> tuple:
    """(input ids, the other forward arguments, the kept positions, `wanted` in the same layout) of `model_inputs`:
    packed into one row with `model`'s mRoPE positions when `padding_free` (`keep` maps back to the padded layout,
    `packing.unpack`), else padded with a mask. `model`: the latent model (unwrapped), whose positions they are."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    common = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                  latent_embeds=inputs["latent_embeds"])
    if not padding_free:
        return ids, {**common, "attention_mask": mask}, None, wanted
    positions, _ = model.mrope_positions(ids, mask, inputs["image_grid_thw"])
    ids, positions, keep = pack(ids, mask, positions)
    return ids, {**common, "position_ids": positions}, keep, None if wanted is None else wanted[keep][None]


def _with_entropy(log_probs_head, hidden_states, lm_head, temperature: float, chunk_size: int) -> torch.Tensor:
    """(2, n): the next-token log-probs and the next-token entropies, one head output (not a view)."""
    return torch.stack([log_probs_head(hidden_states, lm_head),
                        next_token_entropy(hidden_states, lm_head, temperature, chunk_size)])


def _with_rows(head, rows_head, hidden_states, lm_head, rows: torch.Tensor) -> tuple:
    """(`head`'s output, `_rows`)."""
    return head(hidden_states, lm_head), _rows(rows_head, hidden_states, lm_head, rows)


def _rows(rows_head, hidden_states, lm_head, rows: torch.Tensor):
    """`rows_head` of the hidden states at `rows` of hidden[:, :-1]: token t is predicted from the hidden state at
    t − 1."""
    return rows_head(hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])[rows], lm_head)


def unwrapped(module):
    """The latent model under optional PEFT wrapping (FSDP keeps methods on the module itself)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def _latent_pad_id(module) -> int:
    return unwrapped(module).latent_tokens.pad


# ---- micro-batches: a fixed number of samples, or a token budget (dynamic batching) -------------------------------
def micro_batches(batch, size: int, budget: int = 0, padding_free: bool = True) -> list:
    """`batch` in consecutive micro-batches, in order: `size` samples each, or (`budget` > 0) at most `budget` tokens
    each (`sample_tokens`), as few as any rank needs and as even as they can be (`token_budget_groups`).

    Every rank gets the same number of micro-batches: each is a collective FSDP forward (and backward). Consecutive
    groups keep the samples in order, so scores concatenate back without a permutation; the loss does not depend on
    where micro-batches are cut (it is normalised by the mini-batch's global counts).
    """
    if budget <= 0:
        return batch.split(size)
    lengths = sample_tokens(batch, padding_free).tolist()
    groups = token_budget_groups(lengths, budget, _most_over_ranks(len(token_budget_groups(lengths, budget))))
    return [batch[group.start:group.stop] for group in groups]


def sample_tokens(batch, padding_free: bool) -> torch.Tensor:
    """(B,) tokens each sample costs a forward: its prompt and response tokens when packed (padding-free), the
    padded width when the batch runs padded."""
    mask = batch.tensors["attention_mask"]
    return mask.sum(-1) if padding_free else torch.full((mask.shape[0],), mask.shape[-1])


def token_budget_groups(lengths: list[int], budget: int, parts: int = 0) -> list[range]:
    """Consecutive groups of `lengths` with at most `budget` tokens each: the fewest possible, or `parts` if more,
    with the largest group as small as it can be for that count.

    Greedy filling gives the fewest consecutive groups for a capacity, so the smallest capacity whose greedy count
    fits `parts` (a binary search) is the most even cut; groups are then split further if that count is short.
    """
    too_long = [length for length in lengths if length > budget]
    if too_long:
        raise ValueError(f"a sample of {max(too_long)} tokens exceeds the micro-batch token budget of {budget} "
                         "(worker.actor.ppo_max_token_len_per_gpu / log_prob_max_token_len_per_gpu)")
    if not lengths:
        return []
    parts = max(parts, len(_greedy_groups(lengths, budget)))
    if parts > len(lengths):
        raise ValueError(f"{parts} micro-batches asked of {len(lengths)} samples: ranks hold unequal batches")
    low, high = max(lengths), budget
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if len(_greedy_groups(lengths, middle)) <= parts else (middle + 1, high)
    groups = _greedy_groups(lengths, low)
    while len(groups) < parts:
        widest = max((g for g in groups if len(g) > 1), key=lambda g: sum(lengths[i] for i in g))
        at = groups.index(widest)
        middle = widest.start + len(widest) // 2
        groups[at:at + 1] = [range(widest.start, middle), range(middle, widest.stop)]
    return groups


def _greedy_groups(lengths: list[int], capacity: int) -> list[range]:
    groups, start, total = [], 0, 0
    for index, length in enumerate(lengths):
        if total + length > capacity:
            groups.append(range(start, index))
            start, total = index, 0
        total += length
    return groups + [range(start, len(lengths))]


def _most_over_ranks(count: int) -> int:
    """The largest `count` over the ranks (every rank must run as many FSDP forwards)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return count
    value = torch.tensor([count], device=device_type())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value)
