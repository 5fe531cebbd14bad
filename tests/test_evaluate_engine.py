"""The engine hook behind latent ablations: `SamplingParams.latent_override` changes the latents the model sees and
nothing else (tiny model, native engine, CPU)."""
import pytest
import torch

from monet_models.transformers import sequence_log_probs
from tests.test_rollout_native import check_layout, rescore
from workers.rollout import SamplingParams
from workers.rollout.base import check_latent_override
from tests.helpers import native_engine_and_prompts

K = 3


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model, processor, engine, _, prompts = native_engine_and_prompts(tiny_model_dir)
    return model, processor, engine, prompts


def params(engine, **extra):
    """Greedy text with latent blocks (evaluation's default), biased so blocks open early and often."""
    return SamplingParams(strategy="monet", temperature=0, max_new_tokens=20, latent_size=K, seed=4,
                          logit_bias={engine.tokens.start: 4.0}, **extra)


def first_block_end(sample) -> int:
    return sample.block_positions[0][0] + K + 1  # index of the first </abs_vis_token>


def test_zero_override_feeds_zeros_and_changes_nothing_before_them(setup):
    model, processor, engine, prompts = setup
    direct = engine.generate(prompts, params(engine))
    zero = engine.generate(prompts, params(engine, latent_override="zero"))
    for a, b in zip(direct, zero):
        check_layout(b, engine.tokens, K)
        assert a.block_positions and b.block_positions[0] == a.block_positions[0]
        start = a.block_positions[0][0]
        assert torch.equal(a.response_ids[:first_block_end(a) + 1], b.response_ids[:first_block_end(b) + 1])
        assert torch.equal(a.token_log_probs[:start + 1], b.token_log_probs[:start + 1])  # up to the block: same
        assert b.latents.abs().max() == 0 and a.latents.abs().max() > 0
    # The model really saw zeros: the training forward fed zeros reproduces the zero run's log-probs exactly ...
    ids, out, latents = rescore(model, processor, prompts, zero)
    assert latents.abs().max() == 0
    scored = sequence_log_probs(out.logits, out.hidden_states, ids, latents, engine.tokens.pad, temperature=1.0)
    for row, sample in enumerate(zero):
        sampled = sample.token_log_probs != 0
        assert (scored[row, -len(sample.response_ids):][sampled] - sample.token_log_probs[sampled]).abs().max() < 1e-4
    # ... and they matter: the first token after the block is scored differently than with the model's own latents.
    after = [first_block_end(s) + 1 for s in direct]
    assert any(abs(float(a.token_log_probs[i] - b.token_log_probs[i])) > 1e-4 for a, b, i in zip(direct, zero, after))


def test_given_own_latents_reproduce_the_direct_run_exactly(setup):
    _, _, engine, prompts = setup
    direct = engine.generate(prompts, params(engine))
    replay = engine.generate(prompts, params(engine, latent_override="given",
                                             given_latents=tuple(s.latents for s in direct)))
    for a, b in zip(direct, replay):
        assert torch.equal(a.response_ids, b.response_ids) and a.block_positions == b.block_positions
        assert torch.equal(a.latents, b.latents)
        assert (a.token_log_probs - b.token_log_probs).abs().max() == 0


def test_given_latents_of_another_request_are_fed_in_order_and_cycle(setup):
    _, _, engine, prompts = setup
    direct = engine.generate(prompts, params(engine))
    donor = direct[1].latents[:2]  # fewer than a block needs: cycles
    shuffled = engine.generate(prompts[:1], params(engine, latent_override="given", given_latents=(donor,)))[0]
    expected = donor[torch.arange(shuffled.num_latents) % 2]
    assert torch.equal(shuffled.latents, expected)
    with pytest.raises(ValueError, match="given_latents"):
        engine.generate(prompts[:2], params(engine, latent_override="given", given_latents=(donor,)))
    with pytest.raises(ValueError, match=r"given_latents\[0\]"):
        engine.generate(prompts[:1], params(engine, latent_override="given", given_latents=(donor[:0],)))


def test_noise_override_has_the_norm_of_h_and_is_seeded(setup):
    model, processor, engine, prompts = setup
    noisy = engine.generate(prompts, params(engine, latent_override="noise"))
    again = engine.generate(prompts, params(engine, latent_override="noise"))
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(noisy, again))
    ids, out, latents = rescore(model, processor, prompts, noisy)
    means = out.hidden_states[:, :-1][ids[:, 1:] == engine.tokens.pad]  # the h each latent replaced
    assert torch.allclose(latents.norm(dim=-1), means.norm(dim=-1), rtol=1e-4)
    assert torch.nn.functional.cosine_similarity(latents, means, dim=-1).abs().max() < 0.5


def test_override_is_validated_and_refused_where_not_implemented(setup):
    _, _, engine, _ = setup
    with pytest.raises(ValueError, match="strategy 'monet'"):
        SamplingParams(strategy="greedy", latent_override="zero")
    with pytest.raises(ValueError, match="latent_noise_std"):
        SamplingParams(strategy="monet", latent_override="zero", latent_noise_std=0.1)
    with pytest.raises(ValueError, match="given_latents"):
        SamplingParams(strategy="monet", latent_override="given")
    with pytest.raises(ValueError, match="latent_override must be one of"):
        SamplingParams(strategy="monet", latent_override="shuffle")
    check_latent_override(engine, params(engine, latent_override="noise"))
    from workers.rollout.vllm_engine import VLLMRolloutEngine  # light: vLLM itself loads in the constructor

    with pytest.raises(NotImplementedError, match="VLLMRolloutEngine does not implement"):
        check_latent_override(object.__new__(VLLMRolloutEngine), params(engine, latent_override="zero"))
