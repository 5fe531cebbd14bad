"""The latent-aware forward agrees with a step-by-step KV-cache decode that feeds back hidden states."""
import pytest
import torch
from transformers import AutoModelForImageTextToText, DynamicCache

from monet_models import LatentTokens, add_latent_tokens
from monet_models.transformers import load_latent_model, sequence_log_probs
from tests.helpers import coloured_image, encode_prompts

K = 3


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir):
    torch.manual_seed(0)
    model, processor = load_latent_model(tiny_model_dir, dtype="fp32")
    return model.eval(), processor


def scripted_response(tokens: LatentTokens, text_ids):
    """Two text tokens, one latent block of K steps, two text tokens."""
    return text_ids[:2] + [tokens.start] + [tokens.pad] * K + [tokens.end] + text_ids[2:4]


def stepwise_decode(model, enc, response):
    """Feed `response` one position at a time; latent pads get the previous step's final hidden state."""
    pad_id = model.latent_tokens.pad
    cache = DynamicCache(config=model.config)
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"],
                image_grid_thw=enc["image_grid_thw"], past_key_values=cache, use_cache=True, latent_mode=True)
    mask, deltas = enc["attention_mask"], out.rope_deltas
    last_hidden, last_logits = out.hidden_states[:, -1:], out.logits[:, -1:]
    logits, hiddens, latents = [last_logits], [last_hidden], []
    batch = mask.shape[0]
    for token in response:
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        positions = (mask.sum(-1, keepdim=True) - 1 + deltas).unsqueeze(0).expand(3, batch, 1)
        if token == pad_id:
            latents.append(last_hidden)
            embeds = last_hidden
        else:
            embeds = model.get_input_embeddings()(torch.full((batch, 1), token))
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, latent_mode=True)
        last_hidden, last_logits = out.hidden_states, out.logits
        logits.append(last_logits)
        hiddens.append(last_hidden)
    return torch.cat(logits, 1), torch.cat(hiddens, 1), torch.stack([z[:, 0] for z in latents], 1)


def test_teacher_forced_forward_equals_stepwise_decode(model_and_processor):
    model, processor = model_and_processor
    tokens = model.latent_tokens
    enc = encode_prompts(processor, ["What colour is the shape?", "Which shape?"],
                         [coloured_image((200, 30, 30)), coloured_image((30, 30, 200), size=84)])
    assert (enc["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    text_ids = processor.tokenizer.encode("The answer is red")
    response = scripted_response(tokens, text_ids)
    with torch.no_grad():
        step_logits, step_hidden, latents = stepwise_decode(model, enc, response)
        batch, prompt_len = enc["input_ids"].shape
        full_ids = torch.cat([enc["input_ids"], torch.tensor([response] * batch)], dim=1)
        full_mask = torch.cat([enc["attention_mask"], torch.ones(batch, len(response), dtype=torch.long)], dim=1)
        latent_embeds = latents.reshape(-1, latents.shape[-1])  # row-major: sample, then position
        out = model(input_ids=full_ids, attention_mask=full_mask, pixel_values=enc["pixel_values"],
                    image_grid_thw=enc["image_grid_thw"], latent_embeds=latent_embeds, latent_mode=True)
    forced_logits = out.logits[:, prompt_len - 1:]
    forced_hidden = out.hidden_states[:, prompt_len - 1:]
    assert (forced_logits - step_logits).abs().max() <= 1e-4
    assert (forced_hidden - step_hidden).abs().max() <= 1e-4
    # Latent means at the producing position reproduce the fed vectors: log-density 0 on-policy without noise.
    log_probs = sequence_log_probs(out.logits, out.hidden_states, full_ids, latent_embeds, tokens.pad, sigma=1.0)
    pad_positions = full_ids == tokens.pad
    assert pad_positions.sum() == batch * K
    assert log_probs[pad_positions].abs().max() <= 1e-6


def test_plain_forward_matches_stock_model_and_missing_latents_are_refused(model_and_processor, tiny_model_dir):
    model, processor = model_and_processor
    stock = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    enc = encode_prompts(processor, ["What colour?"], [coloured_image()])
    with torch.no_grad():
        ours = model(**enc, latent_mode=True).logits
        theirs = stock(**enc).logits
    assert (ours - theirs).abs().max() <= 1e-5
    ids = torch.cat([enc["input_ids"], torch.tensor([[model.latent_tokens.start, model.latent_tokens.pad]])], 1)
    with pytest.raises(ValueError, match="0 latent vectors for 1 <abs_vis_token_pad>"):
        model(input_ids=ids, pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"], latent_mode=True)


def test_save_load_round_trip_gives_identical_logits(model_and_processor, tmp_path):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reprocessor = load_latent_model(str(tmp_path))
    enc = encode_prompts(reprocessor, ["What colour?"], [coloured_image()])
    with torch.no_grad():
        assert torch.equal(model(**enc, latent_mode=True).logits, reloaded.eval()(**enc, latent_mode=True).logits)
    assert reloaded.latent_tokens == model.latent_tokens


def test_add_latent_tokens_extends_a_tokenizer_without_them(model_and_processor):
    from transformers import PreTrainedTokenizerFast

    _, processor = model_and_processor
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=processor.tokenizer.backend_tokenizer)
    vocab = tokenizer.get_vocab()
    assert "<abs_vis_token>" in vocab  # the tiny tokenizer already has them: adding again is a no-op
    assert add_latent_tokens(tokenizer) == 0


def test_packed_forward_equals_padded_forward(model_and_processor):
    from monet_models.transformers.packing import pack, unpack

    model, processor = model_and_processor
    enc = encode_prompts(processor, ["What colour is the shape?", "Which?"], [coloured_image(), coloured_image(size=84)])
    ids, mask, pixels, grid = enc["input_ids"], enc["attention_mask"], enc["pixel_values"], enc["image_grid_thw"]
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, latent_mode=True)
        positions, _ = model.mrope_positions(ids, mask, grid)
        packed_ids, packed_positions, keep = pack(ids, mask, positions)
        packed = model(input_ids=packed_ids, position_ids=packed_positions, pixel_values=pixels, image_grid_thw=grid,
                       latent_mode=True)
    assert (unpack(packed.logits, keep)[keep] - padded.logits[keep]).abs().max() <= 1e-4
    assert (unpack(packed.hidden_states, keep)[keep] - padded.hidden_states[keep]).abs().max() <= 1e-4


def test_recurrent_sft_forward_feeds_previous_hidden_states(model_and_processor):
    """After the recurrence, each latent equals the hidden state one position before it (a fixed point)."""
    from monet_models.transformers.latent_recurrence import recurrent_latent_forward

    model, processor = model_and_processor
    tokens = model.latent_tokens
    enc = encode_prompts(processor, ["What colour is the shape?", "Which?"], [coloured_image(), coloured_image(size=84)])
    response = scripted_response(tokens, processor.tokenizer.encode("The answer is red"))
    batch = enc["input_ids"].shape[0]
    ids = torch.cat([enc["input_ids"], torch.tensor([response] * batch)], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones(batch, len(response), dtype=torch.long)], 1)
    with torch.no_grad():
        out, latents = recurrent_latent_forward(model, ids, mask, enc["pixel_values"], enc["image_grid_thw"])
        step_logits, _, step_latents = stepwise_decode(model, enc, response)
    assert (latents - step_latents.reshape(-1, latents.shape[-1])).abs().max() <= 1e-4
    prompt_len = enc["input_ids"].shape[1]
    assert (out.logits[:, prompt_len - 1:] - step_logits).abs().max() <= 1e-4


def test_stock_generate_still_works_on_the_latent_subclass(model_and_processor):
    model, processor = model_and_processor
    enc = encode_prompts(processor, ["What colour?"], [coloured_image()])
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    prompt_len = enc["input_ids"].shape[1]
    assert torch.equal(out[:, :prompt_len], enc["input_ids"]) and prompt_len < out.shape[1] <= prompt_len + 4


def test_config_overrides_reach_the_loaded_model(tiny_model_dir):
    """`worker.actor.model.override_config` replaces config.json fields at load."""
    from monet_models.transformers import load_latent_model

    model, _ = load_latent_model(tiny_model_dir, config_overrides={"text_config": {"attention_dropout": 0.25}})
    assert model.config.text_config.attention_dropout == 0.25
    assert load_latent_model(tiny_model_dir)[0].config.text_config.attention_dropout == 0.0
    with pytest.raises(ValueError, match="override_config.text_config.no_such_field"):
        load_latent_model(tiny_model_dir, config_overrides={"text_config": {"no_such_field": 1}})
