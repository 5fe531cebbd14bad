"""The native rollout engine: exact greedy agreement with `generate`, the latent layout, exact re-scoring by the
training forward, masks, seeds and batch compaction (tiny model, CPU)."""
import pytest
import torch
from transformers import AutoModelForImageTextToText

from monet_models.transformers import sequence_log_probs
from workers.rollout import SamplingParams
from workers.rollout.sampling import request_seed
from tests.helpers import native_engine_and_prompts

K = 3


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    return native_engine_and_prompts(tiny_model_dir)


def blocked_ids(engine, model):
    tokens = engine.tokens
    padding = range(engine.real_vocab_size, model.config.text_config.vocab_size)
    return sorted({*tokens.never_sampled, tokens.start, tokens.end, *padding})


def test_greedy_equals_transformers_generate(setup, tiny_model_dir):
    model, _, engine, enc, prompts = setup
    stock = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    assert (enc["attention_mask"] == 0).any() and len(set(enc["image_grid_thw"][:, 1:].prod(-1).tolist())) == 3
    with torch.no_grad():
        expected = stock.generate(**enc, max_new_tokens=24, do_sample=False, suppress_tokens=blocked_ids(engine, model))
    expected = expected[:, enc["input_ids"].shape[1]:]
    samples = engine.generate(prompts, SamplingParams(strategy="greedy", n=2, max_new_tokens=24))
    assert [(s.prompt_index, s.sample_index) for s in samples] == [(p, i) for p in range(3) for i in range(2)]
    for sample in samples:
        ids = sample.response_ids.tolist()
        assert ids == expected[sample.prompt_index, :len(ids)].tolist()
        assert len(ids) == 24 or ids[-1] == engine.tokens.eos


def test_repetition_penalty_matches_generate(setup, tiny_model_dir):
    model, _, engine, enc, prompts = setup
    stock = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    single = {key: value[:1] for key, value in enc.items() if key not in ("pixel_values", "image_grid_thw")}
    count = int(enc["image_grid_thw"][0].prod())
    single.update(pixel_values=enc["pixel_values"][:count], image_grid_thw=enc["image_grid_thw"][:1])
    keep = single["attention_mask"][0].bool()
    single = {**single, "input_ids": single["input_ids"][:, keep], "attention_mask": single["attention_mask"][:, keep],
              "mm_token_type_ids": single["mm_token_type_ids"][:, keep]}
    with torch.no_grad():
        expected = stock.generate(**single, max_new_tokens=16, do_sample=False, repetition_penalty=1.5,
                                  suppress_tokens=blocked_ids(engine, model))[0, keep.sum():]
    sample = engine.generate(prompts[:1], SamplingParams(strategy="greedy", max_new_tokens=16, repetition_penalty=1.5))[0]
    assert sample.response_ids.tolist() == expected[:len(sample.response_ids)].tolist()


def check_layout(sample, tokens, K):
    """Every block: <abs_vis_token>, K pads, </abs_vis_token>; only a length-truncated last block may be short."""
    ids = sample.response_ids.tolist()
    i, blocks, latents = 0, [], 0
    while i < len(ids):
        if ids[i] in (tokens.pad, tokens.end):
            raise AssertionError(f"{ids[i]} outside a block at {i}: {ids}")
        if ids[i] != tokens.start:
            i += 1
            continue
        body = ids[i + 1:i + 2 + K]
        pads = len(body) - (body[-1:] == [tokens.end])
        assert body[:pads] == [tokens.pad] * pads, ids
        if len(body) == K + 1:
            assert body[-1] == tokens.end, ids
        else:
            assert sample.truncated_block and i + 1 + len(body) == len(ids) and sample.finish_reason == "length"
        blocks.append((i, pads))
        latents += pads
        i += 1 + len(body)
    assert sample.block_positions == blocks
    assert sample.num_latents == latents
    assert sample.truncated_block == (bool(blocks) and blocks[-1][1] + blocks[-1][0] + 1 == len(ids)
                                      and ids[-1] != tokens.end)


def rescore(model, processor, prompts, samples):
    """The training forward over prompt + response with the recorded latents, left-padded like the trainer does."""
    rows = [torch.cat([prompts[s.prompt_index].input_ids, s.response_ids]) for s in samples]
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), processor.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(rows):
        ids[row, longest - len(sequence):] = sequence
        mask[row, longest - len(sequence):] = 1
    pixels = torch.cat([prompts[s.prompt_index].pixel_values for s in samples])
    grid = torch.cat([prompts[s.prompt_index].image_grid_thw for s in samples])
    latents = [s.latents for s in samples if s.latents is not None]
    latents = torch.cat(latents) if latents else None
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                    latent_embeds=latents, latent_mode=True)
    return ids, out, latents


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_monet_layout_and_exact_rescoring(setup, noise):
    model, processor, engine, _, prompts = setup
    tokens = engine.tokens
    params = SamplingParams(strategy="monet", n=3, temperature=0.8, top_p=0.95, max_new_tokens=40, latent_size=K,
                            latent_noise_std=noise, seed=3, logit_bias={tokens.start: 3.0})
    samples = engine.generate(prompts, params)
    complete = 0
    for sample in samples:
        check_layout(sample, tokens, K)
        complete += sum(n == K for _, n in sample.block_positions)
        assert tokens.eos not in sample.response_ids[:-1].tolist()
    assert complete >= 3, "the bias must open blocks"
    ids, out, latents = rescore(model, processor, prompts, samples)
    log_probs = sequence_log_probs(out.logits, out.hidden_states, ids, latents, tokens.pad, temperature=0.8)
    for row, sample in enumerate(samples):
        length = len(sample.response_ids)
        sampled = sample.token_log_probs != 0
        assert sampled.sum() == (sample.response_mask.bool() & (sample.response_ids != tokens.pad)).sum()
        assert (log_probs[row, -length:][sampled] - sample.token_log_probs[sampled]).abs().max() <= 1e-4
    means = out.hidden_states[:, :-1][ids[:, 1:] == tokens.pad]
    deviation = latents - means
    if noise == 0:
        assert deviation.abs().max() <= 1e-4
    else:
        assert abs(deviation.std().item() - noise) <= 0.1 * noise


def test_truncated_block_is_flagged_and_kept(setup):
    model, _, engine, _, prompts = setup
    tokens = engine.tokens
    force = {tokens.start: 1e4}
    cut = engine.generate(prompts[:1], SamplingParams(strategy="monet", max_new_tokens=3, latent_size=4, seed=0,
                                                      logit_bias=force))[0]
    assert cut.response_ids.tolist() == [tokens.start, tokens.pad, tokens.pad]
    assert cut.truncated_block and cut.finish_reason == "length" and cut.block_positions == [(0, 2)]
    assert cut.latents.shape == (2, model.config.text_config.hidden_size) and cut.latents.dtype == torch.float32
    assert cut.response_mask.tolist() == [1, 0, 0] and cut.token_log_probs[1:].eq(0).all()
    whole = engine.generate(prompts[:1], SamplingParams(strategy="monet", max_new_tokens=6, latent_size=4, seed=0,
                                                        logit_bias=force))[0]
    assert whole.response_ids.tolist() == [tokens.start] + [tokens.pad] * 4 + [tokens.end]
    assert not whole.truncated_block and whole.block_positions == [(0, 4)]
    assert whole.response_mask.tolist() == [1, 1, 1, 1, 1, 0]


def test_never_sampled_ids_and_seeds(setup):
    model, _, engine, _, prompts = setup
    tokens = engine.tokens
    bias = {token: 30.0 for token in (*tokens.never_sampled, tokens.start, tokens.end)}
    params = SamplingParams(strategy="sample", n=4, temperature=1.5, max_new_tokens=32, seed=7, logit_bias=bias)
    first = engine.generate(prompts, params)
    produced = torch.cat([s.response_ids for s in first])
    assert not torch.isin(produced, torch.tensor(blocked_ids(engine, model))).any()
    again = engine.generate(prompts, params)
    assert all(torch.equal(a.response_ids, b.response_ids) and torch.equal(a.token_log_probs, b.token_log_probs)
               for a, b in zip(first, again))
    other = engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert any(not torch.equal(a.response_ids, b.response_ids) for a, b in zip(first, other))
    monet = engine.generate(prompts, SamplingParams(**{**params.__dict__, "strategy": "monet", "latent_size": K,
                                                       "logit_bias": {t: 30.0 for t in tokens.never_sampled}}))
    produced = torch.cat([s.response_ids for s in monet])
    assert not torch.isin(produced, torch.tensor([t for t in tokens.never_sampled if t != tokens.pad])).any()


def staggered_stop(engine, prompts) -> int:
    """A token the greedy continuations first produce at two different steps (and one never): used as a stop token,
    rows finish at different times whatever the random tiny model prefers."""
    free = engine.generate(prompts, SamplingParams(strategy="greedy", max_new_tokens=30, ignore_eos=True))
    rows = [s.response_ids.tolist() for s in free]
    for token in sorted(set(sum(rows, []))):
        firsts = [row.index(token) for row in rows if token in row[:28]]
        if len(set(firsts)) >= 2 and len(firsts) < len(rows):
            return token
    pytest.fail(f"no token stops the greedy rows at staggered steps: {rows}")


def test_compaction_changes_nothing_but_the_work(setup):
    _, _, engine, _, prompts = setup
    params = SamplingParams(strategy="greedy", n=2, max_new_tokens=30, stop_token_ids=(staggered_stop(engine, prompts),))
    compacting = engine.generate(prompts, params)
    compacted_work = engine.stats["row_forwards"]
    assert engine.stats["compactions"] >= 2
    lengths = [len(s.response_ids) for s in compacting]
    assert min(lengths) < max(lengths), "some rows must finish early for compaction to matter"
    assert any(s.finish_reason == "eos" and s.response_ids[-1] == params.stop_token_ids[0] for s in compacting)
    engine.compact_fraction = 2.0  # never compact
    try:
        plain = engine.generate(prompts, params)
    finally:
        engine.compact_fraction = 0.25
    assert engine.stats["compactions"] == 0 and engine.stats["row_forwards"] > 1.3 * compacted_work
    for a, b in zip(compacting, plain):
        assert torch.equal(a.response_ids, b.response_ids) and a.finish_reason == b.finish_reason
        assert (a.token_log_probs - b.token_log_probs).abs().max() <= 1e-5


def one_prompt_at_a_time(engine, prompts, params):
    """The same generate call with the engine limited to one prompt per batch."""
    engine.max_batch_prompts = 1
    try:
        return engine.generate(prompts, params)
    finally:
        engine.max_batch_prompts = None


def test_text_only_prompt_and_chunking(setup):
    model, processor, engine, _, prompts = setup
    text = processor.tokenizer("Hello there", return_tensors="pt")["input_ids"][0]
    from workers.rollout import PromptInput
    mixed = [prompts[0], PromptInput(text), prompts[1]]
    params = SamplingParams(strategy="greedy", max_new_tokens=8)
    together = engine.generate(mixed, params)
    apart = one_prompt_at_a_time(engine, mixed, params)
    assert [s.prompt_index for s in apart] == [0, 1, 2]
    for a, b in zip(together, apart):
        assert a.response_ids.tolist() == b.response_ids.tolist()


def test_latent_noise_is_drawn_per_request_from_its_seed(setup):
    """Request i (= prompt * n + sample) draws its noise, at placement, from a generator seeded with
    request_seed(seed, i): the contract that lets the vLLM engine reproduce these latents exactly."""
    model, processor, engine, _, prompts = setup
    tokens, noise = engine.tokens, 0.5
    params = SamplingParams(strategy="monet", n=2, temperature=0, max_new_tokens=12, latent_size=K,
                            latent_noise_std=noise, seed=11, logit_bias={tokens.start: 5.0})
    together = engine.generate(prompts, params)
    apart = one_prompt_at_a_time(engine, prompts, params)
    ids, out, _ = rescore(model, processor, prompts, together)
    means = out.hidden_states[:, :-1][ids[:, 1:] == tokens.pad]
    offset = 0
    for sample, other in zip(together, apart):
        assert (sample.latents - other.latents).abs().max() <= 1e-5 and sample.num_latents >= K
        generator = torch.Generator().manual_seed(request_seed(11, sample.prompt_index * 2 + sample.sample_index))
        draws = torch.stack([torch.randn(sample.latents.shape[1], generator=generator) for _ in sample.latents])
        deviation = sample.latents - means[offset:offset + sample.num_latents]
        assert (deviation - noise * draws).abs().max() <= 1e-4
        offset += sample.num_latents


def test_monet_at_temperature_zero_chooses_text_greedily(setup):
    _, _, engine, _, prompts = setup
    params = SamplingParams(strategy="monet", temperature=0, max_new_tokens=16, latent_size=K,
                            logit_bias={engine.tokens.start: 2.0})
    first = engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": 1}))
    second = engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": 2}))
    assert all(torch.equal(a.response_ids, b.response_ids) for a, b in zip(first, second))
    assert any(s.block_positions for s in first)
    with pytest.raises(ValueError, match="greedy"):
        SamplingParams(strategy="sample", temperature=0)


def test_update_weights_copies_in_place(setup, tiny_model_dir):
    model, _, engine, _, prompts = setup
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    before = engine.generate(prompts, SamplingParams(strategy="greedy", max_new_tokens=8))
    try:
        engine.update_weights((name, t + 0.05 * torch.randn_like(t)) for name, t in original.items()
                              if t.is_floating_point())
        changed = engine.generate(prompts, SamplingParams(strategy="greedy", max_new_tokens=8))
        assert any(not torch.equal(a.response_ids, b.response_ids) for a, b in zip(before, changed))
        with pytest.raises(KeyError, match="no parameters named"):
            engine.update_weights({"model.no_such.weight": torch.zeros(1)})
    finally:
        engine.update_weights(original)
    again = engine.generate(prompts, SamplingParams(strategy="greedy", max_new_tokens=8))
    assert all(torch.equal(a.response_ids, b.response_ids) for a, b in zip(before, again))


def test_relative_noise_is_a_fraction_of_each_hidden_states_rms(setup):
    model, processor, engine, _, prompts = setup
    tokens = engine.tokens
    params = SamplingParams(strategy="monet", n=2, temperature=0, max_new_tokens=12, latent_size=K, seed=11,
                            latent_noise_std=0.05, latent_noise_relative=True, logit_bias={tokens.start: 5.0})
    samples = engine.generate(prompts, params)
    ids, out, _ = rescore(model, processor, prompts, samples)
    means = out.hidden_states[:, :-1][ids[:, 1:] == tokens.pad]
    latents = torch.cat([s.latents for s in samples])
    ratio = (latents - means).pow(2).mean(-1).sqrt() / means.pow(2).mean(-1).sqrt()
    assert len(ratio) > 0 and (ratio - 0.05).abs().max() < 0.03  # ~5% of each vector's own RMS, whatever its scale
