"""The KV-cached latent recurrence equals the per-latent one (values and gradients, fp32, max |Δ| <= 1e-4)."""
import pytest
import torch

from monet_models.transformers import load_latent_model
from monet_models.transformers.exact_recurrence import exact_latent_forward
from monet_models.transformers.latent_recurrence import count_rounds, recurrent_latent_forward
from tests.helpers import coloured_image, encode_prompts

K = 3
TOL = 1e-4


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir):
    model, processor = load_latent_model(tiny_model_dir, dtype="fp32")
    return model.train(), processor  # train mode: the recurrence is used with gradients


def batch(model, processor, hidden_span: bool = False):
    """Two left-padded samples: the first with two latent blocks, the second with one (right padding after it);
    with `hidden_span` the first sample's prompt image is seen only by its first block."""
    tokens = model.latent_tokens
    enc = encode_prompts(processor, ["What colour is the shape?", "Which?"],
                         [coloured_image(), coloured_image(size=84)])
    text = processor.tokenizer.encode("The answer is red")
    block = [tokens.start] + [tokens.pad] * K + [tokens.end]
    response = text[:2] + block + text[2:4] + block + text[:3]
    rows = enc["input_ids"].shape[0]
    ids = torch.cat([enc["input_ids"], torch.tensor([response] * rows)], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones(rows, len(response), dtype=torch.long)], 1)
    ids[1, -(len(block) + 3):], mask[1, -(len(block) + 3):] = tokens.pad_token, 0
    hidden = view = None
    if hidden_span:
        image = ids[0] == model.config.image_token_id
        hidden, view = torch.zeros_like(ids), torch.zeros_like(ids)
        hidden[0, image], view[0, image] = 1, 1
        view[0, (ids[0] == tokens.pad).nonzero().flatten()[:K]] = 1
    return ids, mask, enc["pixel_values"], enc["image_grid_thw"], hidden, view


def loss_and_grads(model, out_logits, layer1, mask):
    valid = mask.bool()
    loss = out_logits[valid].float().logsumexp(-1).mean() + layer1[valid].pow(2).mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("hidden_span, checkpoint", [(False, False), (True, False), (True, True)])
def test_fast_recurrence_equals_the_per_latent_passes(model_and_processor, hidden_span, checkpoint):
    model, processor = model_and_processor
    ids, mask, pixels, grid, hidden, view = batch(model, processor, hidden_span)
    if checkpoint:  # as the trainer loads it: transformers' per-layer checkpointing on, which drops KV caches
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fast, latents = recurrent_latent_forward(model, ids, mask, pixels, grid, hidden=hidden, view=view, layers=(1,),
                                             checkpoint=checkpoint)
    fast_loss, fast_grads = loss_and_grads(model, fast.logits, fast.layers[1], mask)
    model.gradient_checkpointing_disable()
    exact, exact_latents, exact_layers = exact_latent_forward(model, ids, mask, pixels, grid, hidden=hidden, view=view,
                                                              layers=(1,))
    exact_loss, exact_grads = loss_and_grads(model, exact.logits, exact_layers[1], mask)
    valid = mask.bool()
    assert latents.shape == (3 * K, model.config.text_config.hidden_size)  # 2 + 1 blocks, row-major
    assert (latents - exact_latents).abs().max() <= TOL
    assert (fast.logits[valid] - exact.logits[valid]).abs().max() <= TOL
    assert (fast.hidden_states[valid] - exact.hidden_states[valid]).abs().max() <= TOL
    assert (fast.layers[1][valid] - exact_layers[1][valid]).abs().max() <= TOL
    assert abs(float(fast_loss - exact_loss)) <= TOL
    assert fast_grads.keys() == exact_grads.keys() and len(fast_grads) > 10
    assert max(float((fast_grads[k] - exact_grads[k]).abs().max()) for k in exact_grads) <= TOL
    # every latent is the hidden state one position before its pad: the recurrence's fixed point
    pads = (ids == model.latent_tokens.pad) & valid
    rows, cols = pads.nonzero(as_tuple=True)
    assert (fast.hidden_states[rows, cols - 1] - latents).abs().max() <= TOL


def test_hidden_span_changes_what_later_tokens_see(model_and_processor):
    model, processor = model_and_processor
    ids, mask, pixels, grid, hidden, view = batch(model, processor, hidden_span=True)
    with torch.no_grad():
        open_, _ = recurrent_latent_forward(model, ids, mask, pixels, grid)
        hid, _ = recurrent_latent_forward(model, ids, mask, pixels, grid, hidden=hidden, view=view)
    first_pad = int((ids[0] == model.latent_tokens.pad).nonzero()[0])
    assert (open_.hidden_states[1] - hid.hidden_states[1]).abs().max() <= 1e-5  # the other sample is untouched
    assert (open_.hidden_states[0, -1] - hid.hidden_states[0, -1]).abs().max() > 1e-4  # the answer lost the image
    assert count_rounds(ids, mask, model.latent_tokens.pad, view) > count_rounds(ids, mask, model.latent_tokens.pad)
    assert (hid.hidden_states[0, first_pad] - open_.hidden_states[0, first_pad]).abs().max() > 0


def test_given_latents_and_extra_rounds_change_nothing(model_and_processor):
    """Feeding the recurrence's own latents is a teacher-forced pass; padding to more rounds (what FSDP ranks do
    to make the same calls) leaves every output as it was."""
    model, processor = model_and_processor
    ids, mask, pixels, grid, _, _ = batch(model, processor)
    with torch.no_grad():
        out, latents = recurrent_latent_forward(model, ids, mask, pixels, grid)
        padded, _ = recurrent_latent_forward(model, ids, mask, pixels, grid, rounds=count_rounds(
            ids, mask, model.latent_tokens.pad) + 3)
        forced = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                       latent_embeds=latents, latent_mode=True)
        given, _ = recurrent_latent_forward(model, ids, mask, pixels, grid, latents=torch.zeros_like(latents))
    valid = mask.bool()
    assert torch.equal(padded.logits[valid], out.logits[valid])
    assert (forced.logits[valid] - out.logits[valid]).abs().max() <= TOL
    assert (given.logits[valid] - out.logits[valid]).abs().max() > 1e-3  # other latents, other outputs


def _rank_with_or_without_latents(rank: int, model_dir: str, port: int) -> None:
    """One FSDP2 rank: rank 0's rows hold a latent block, rank 1's none; a recurrence forward and backward."""
    import os

    import torch.distributed as dist

    from workers.actor.fsdp import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, _ = load_latent_model(model_dir, dtype="fp32")
        shard_model(model.train())
        tokens = model.latent_tokens
        middle = [tokens.start] + [tokens.pad] * K + [tokens.end] if rank == 0 else [16, 17, 18, 19, 20]
        ids = torch.tensor([[10, 11, 12, 13, *middle, 14, 15]] * 2)
        mask = torch.ones_like(ids)
        rounds = torch.tensor(count_rounds(ids, mask, tokens.pad, None))
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)  # as the SFT losses do: every rank runs the most rounds
        out, _ = recurrent_latent_forward(model, ids, mask, rounds=int(rounds))
        out.logits.logsumexp(-1).mean().backward()
        assert all(p.grad is not None for name, p in model.named_parameters() if "visual" not in name)
    finally:
        dist.destroy_process_group()


def test_fsdp_ranks_with_and_without_latents_make_the_same_collectives(tiny_model_dir):
    """A rank whose micro-batch has no latent runs empty rounds; its backward must gather and reduce the shards in the
    same order as a rank with latents (before the fix gloo aborted on mismatched all-gathers)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank_with_or_without_latents, args=(tiny_model_dir, port), nprocs=2, join=True)
