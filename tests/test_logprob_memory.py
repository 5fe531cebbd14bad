"""Log-prob memory and token-budget micro-batches: chunked token log-probs (from logits, or from hidden states through
lm_head) equal the unchunked ones in values and gradients; dynamic batching keeps every micro-batch within its token
budget and changes neither the loss, the gradients nor the scores of the real FSDP update."""
import copy
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from RL.config import ConfigError, load_config
from RL.protocol import Batch
from monet_models.transformers.log_probs import (
    head_log_probs, next_token_log_probs, sequence_log_probs, token_log_probs, with_latent_densities)
from tests.helpers import gradients_of_one_step
from workers.actor.model_inputs import micro_batches, sample_tokens, token_budget_groups

PAD = 7  # the latent pad id of the synthetic sequences


def close(got, want, tolerance=1e-6):
    """Equal to `tolerance` relative to the size of the values (1e-6 absolute near 0): fp32 rounds a log-prob of
    -20 to steps of 2e-6, and a matmul over a different number of rows may round differently."""
    return bool(((got - want).abs() <= tolerance * (1 + want.abs())).all())


def reference_log_probs(logits, tokens, temperature):
    """The textbook formula in fp64: what both the chunked and the unchunked code must approximate."""
    return torch.log_softmax(logits.double() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_token_log_probs_equal_unchunked_values_and_gradients(temperature):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 37, 301, generator=generator)).requires_grad_()
    tokens = torch.randint(0, 301, (2, 37), generator=generator)
    weights = torch.randn(2, 37, generator=generator)
    untouched = logits.detach().clone()
    results = {}
    for chunk in (0, 5, 37):
        values = token_log_probs(logits, tokens, temperature, chunk)
        results[chunk] = (values.detach(), torch.autograd.grad((values * weights).sum(), logits)[0])
    assert torch.equal(logits.detach(), untouched)  # the temperature never divides the caller's fp32 logits
    for chunk in (5, 37):
        assert close(results[chunk][0], results[0][0]) and close(results[chunk][1], results[0][1])
    expected = reference_log_probs(logits.detach(), tokens, temperature)
    assert (results[0][0].double() - expected).abs().max() < 1e-5


def test_chunked_head_log_probs_equal_full_logits_in_values_and_all_gradients():
    """From hidden states through a linear lm_head: the gradients reach the hidden states and the weight."""
    generator = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 301, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(301, 16, generator=generator))
    hidden = torch.randn(3, 11, 16, generator=generator).requires_grad_()
    tokens = torch.randint(0, 301, (3, 11), generator=generator)
    weights = torch.randn(3, 11, generator=generator)
    outcomes = []
    for chunk in (0, 4):
        values = head_log_probs(head, hidden, tokens, 0.8, chunk)
        grads = torch.autograd.grad((values * weights).sum(), [hidden, head.weight])
        outcomes.append([values.detach(), *grads])
    unchunked_from_logits = token_log_probs(head(hidden), tokens, 0.8)
    assert close(outcomes[1][0], unchunked_from_logits.detach())
    assert all(close(got, want) for got, want in zip(outcomes[1], outcomes[0]))


def test_latent_positions_keep_their_gaussian_terms_when_chunked():
    """The whole sequence: next-token log-probs from hidden states, Gaussian densities at latent pads, 0 first."""
    generator = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(8, 40, bias=False)
    ids = torch.randint(10, 40, (2, 9), generator=generator)
    ids[0, 3:5] = PAD
    ids[1, 6] = PAD
    hidden = torch.randn(2, 9, 8, generator=generator).requires_grad_()
    latents = torch.randn(3, 8, generator=generator).requires_grad_()
    weights = torch.randn(2, 9, generator=generator)

    def scored(chunk):
        if chunk is None:  # the logits path, unchunked: what the model's full logits give
            values = sequence_log_probs(head(hidden), hidden, ids, latents, PAD, 0.6, sigma=2.0)
        else:
            text = next_token_log_probs(hidden, head, ids, 0.6, chunk).view(2, 8)
            values = with_latent_densities(text, hidden, ids, latents, PAD, sigma=2.0)
        return [values.detach(), *torch.autograd.grad((values * weights).sum(), [hidden, latents, head.weight])]

    full, chunked = scored(None), scored(3)
    assert full[0][:, 0].eq(0).all() and full[0][ids == PAD].ne(0).all()
    assert all(close(got, want) for got, want in zip(chunked, full))


# ---- token-budget micro-batches -----------------------------------------------------------------------------------
def test_token_budget_groups_respect_the_budget_and_keep_the_order():
    generator = torch.Generator().manual_seed(3)
    for trial in range(200):
        lengths = torch.randint(1, 60, (int(torch.randint(1, 25, (1,), generator=generator)),),
                                generator=generator).tolist()
        budget = max(lengths) + int(torch.randint(0, 80, (1,), generator=generator))
        fewest = token_budget_groups(lengths, budget)
        assert [i for group in fewest for i in group] == list(range(len(lengths)))  # consecutive, all, in order
        assert all(sum(lengths[i] for i in group) <= budget for group in fewest)
        greedy, total = 1, 0  # greedy filling: the fewest consecutive groups
        for length in lengths:
            greedy, total = (greedy + 1, length) if total + length > budget else (greedy, total + length)
        assert len(fewest) == greedy
        parts = min(len(lengths), len(fewest) + trial % 3)  # another rank may need more micro-batches
        even = token_budget_groups(lengths, budget, parts)
        assert len(even) == parts and [i for group in even for i in group] == list(range(len(lengths)))
        assert max(sum(lengths[i] for i in group) for group in even) <= budget


def test_token_budget_groups_balance_and_refuse_a_sample_over_budget():
    assert token_budget_groups([5, 5, 5, 5], 15) == [range(0, 2), range(2, 4)]  # not 15 + 5
    with pytest.raises(ValueError, match="ppo_max_token_len_per_gpu"):
        token_budget_groups([3, 20, 4], 10)
    with pytest.raises(ValueError, match="unequal"):
        token_budget_groups([3, 3], 10, parts=3)


def test_micro_batches_count_real_tokens_when_packed_and_the_width_when_padded():
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    batch = Batch({"attention_mask": mask, "row": torch.arange(4)})
    assert sample_tokens(batch, padding_free=True).tolist() == [3, 5, 2, 2]
    parts = micro_batches(batch, size=1, budget=7, padding_free=True)
    assert [part.tensors["row"].tolist() for part in parts] == [[0], [1], [2, 3]]
    padded = micro_batches(batch, size=1, budget=10, padding_free=False)  # 5 per sample: two per micro-batch
    assert [part.tensors["row"].tolist() for part in padded] == [[0, 1], [2, 3]]
    assert [len(part) for part in micro_batches(batch, size=3)] == [3, 1]  # budget 0: fixed sample count


def _micro_batch_sizes(rank: int, port: int, masks: list, folder: str) -> None:
    """One rank of a gloo world of two: its micro-batch sizes under a budget of 8 tokens, written to a file."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        parts = micro_batches(Batch({"attention_mask": torch.tensor(masks[rank])}), size=1, budget=8)
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps([len(part) for part in parts]))
    finally:
        dist.destroy_process_group()


def test_every_rank_runs_as_many_micro_batches(tmp_path):
    """FSDP's forward is collective: the rank that fits its samples in fewer micro-batches cuts as many as the
    other needs (here rank 0 fits in one, rank 1 needs three)."""
    ones = lambda n: [1] * n + [0] * (8 - n)  # noqa: E731
    masks = [[ones(2), ones(2), ones(2)], [ones(8), ones(8), ones(8)]]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_micro_batch_sizes, args=(port, masks, str(tmp_path)), nprocs=2)
    sizes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert sizes == [[1, 1, 1], [1, 1, 1]]


def test_config_refuses_a_budget_below_the_longest_sequence():
    base = ["data.train_files=train.jsonl", "worker.actor.model.model_path=/models/tiny",
            "data.max_prompt_length=100", "data.max_response_length=50", "worker.actor.dynamic_batching=true"]
    with pytest.raises(ConfigError, match="worker.actor.ppo_max_token_len_per_gpu.*150"):
        load_config(base + ["worker.actor.ppo_max_token_len_per_gpu=149"])
    with pytest.raises(ConfigError, match="worker.actor.log_prob_max_token_len_per_gpu"):
        load_config(base + ["worker.actor.log_prob_max_token_len_per_gpu=10"])
    with pytest.raises(ConfigError, match="worker.actor.logprob_chunk_size"):
        load_config(base + ["worker.actor.logprob_chunk_size=-1"])
    cfg = load_config(base + ["worker.actor.ppo_max_token_len_per_gpu=150",
                              "worker.actor.log_prob_max_token_len_per_gpu=150"])
    assert cfg.worker.actor.dynamic_batching and cfg.worker.actor.logprob_chunk_size == 1024


# ---- the real update in one process (FSDP2 over a gloo world of one) ---------------------------------------------
@pytest.fixture(scope="module")
def actor_and_batch(process_group, tiny_model_dir, toy_data_dir):
    """The tiny actor and a scored batch of four rollouts of different lengths (latent blocks included)."""
    from monet_models.transformers import load_latent_model
    from tests.helpers import latent_rollout_batch
    from workers.actor.policy import Policy
    from workers.actor.sharded_model import ShardedModel

    config = load_config([
        "config=examples/config/vlpo_tiny_cpu.yaml", f"worker.actor.model.model_path={tiny_model_dir}",
        f"data.train_files={toy_data_dir}/train.jsonl", "worker.rollout.latent_size=3"])
    model = ShardedModel(tiny_model_dir, config.worker.actor, trainable=True)
    actor = Policy.build("actor", model, None, config.worker.actor.optim, total_steps=4)
    reference, processor = load_latent_model(tiny_model_dir)
    batch = latent_rollout_batch(reference, processor, "Which shape is it, and where?", n=2, max_new_tokens=12,
                                 latent_size=3)
    cfg = config.worker.actor
    batch.tensors["old_log_probs"], batch.tensors["ref_latent_means"] = actor.model.score_with_means(
        batch, sigma=cfg.monet_rl_sigma, adapter=None)
    batch.tensors["old_log_probs"] -= 0.1
    batch.tensors["ref_log_probs"] = batch.tensors["old_log_probs"] + 0.05
    batch.tensors["advantages"] = torch.tensor([1.0, -0.5, 2.0, -1.5])[:, None].expand_as(
        batch.tensors["old_log_probs"]).contiguous()
    return actor, batch, cfg


def loss_and_gradients(actor, batch, settings):
    """pg/kl loss and the full gradients of one optimizer step at learning rate 0 (the weights do not move)."""
    from workers.actor.updates import ppo_update

    metrics, grads = gradients_of_one_step(
        actor.model.module, actor.optimizer,
        lambda: ppo_update(actor, batch, settings, mini_batch_size=len(batch), kl_coef=0.1))
    assert "actor/skipped_steps" not in metrics and grads
    return metrics, grads


def assert_same_update(first, second):
    (metrics_a, grads_a), (metrics_b, grads_b) = first, second
    for key in ("actor/pg_loss", "actor/kl_loss", "actor/grad_norm"):
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-5, abs=1e-7), key
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert torch.allclose(grads_b[name], grad, rtol=1e-4, atol=1e-6), name
    assert metrics_a["actor/grad_norm"] > 0


@pytest.mark.parametrize("mode", ["token", "seq"])
def test_dynamic_batching_gives_the_update_of_fixed_micro_batches(actor_and_batch, mode):
    actor, batch, cfg = actor_and_batch
    lengths = sample_tokens(batch, padding_free=True)
    fixed, dynamic = copy.deepcopy(cfg), copy.deepcopy(cfg)
    fixed.loss_avg_mode = dynamic.loss_avg_mode = mode
    fixed.micro_batch_size_per_device_for_update = len(batch)  # one micro-batch
    fixed.max_grad_norm = dynamic.max_grad_norm = 1e9  # no clipping: the raw gradients are compared
    dynamic.dynamic_batching = True
    dynamic.ppo_max_token_len_per_gpu = int(lengths.max() + lengths.min())
    assert len(micro_batches(batch, 1, dynamic.ppo_max_token_len_per_gpu)) in (2, 3)
    assert_same_update(loss_and_gradients(actor, batch, fixed), loss_and_gradients(actor, batch, dynamic))


def test_chunked_log_probs_give_the_update_and_scores_of_full_logits(actor_and_batch):
    actor, batch, cfg = actor_and_batch
    settings = copy.deepcopy(cfg)
    settings.max_grad_norm = 1e9
    model_config = actor.model.config
    outcomes = []
    try:
        for chunk in (0, 7):
            model_config.logprob_chunk_size = chunk
            scores = actor.model.score_with_means(batch, sigma=cfg.monet_rl_sigma, adapter=None)
            outcomes.append((scores, loss_and_gradients(actor, batch, settings)))
    finally:
        model_config.logprob_chunk_size = cfg.logprob_chunk_size
    (scores_a, update_a), (scores_b, update_b) = outcomes
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(scores_a, scores_b))
    assert_same_update(update_a, update_b)


def test_dynamic_scores_come_back_in_sample_order(actor_and_batch):
    actor, batch, cfg = actor_and_batch
    model_config = actor.model.config
    fixed = actor.model.score_with_means(batch, sigma=cfg.monet_rl_sigma, adapter=None)
    lengths = sample_tokens(batch, padding_free=True)
    try:
        model_config.dynamic_batching, model_config.log_prob_max_token_len_per_gpu = True, int(lengths.max())
        dynamic = actor.model.score_with_means(batch, sigma=cfg.monet_rl_sigma, adapter=None)
    finally:
        model_config.dynamic_batching = False
    assert len(micro_batches(batch, 8, int(lengths.max()))) > 1
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(fixed, dynamic))
    assert fixed[0].abs().sum() > 0
