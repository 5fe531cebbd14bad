"""The latent state machine alone: block layout, forced tokens and masks, on hand-made token streams."""
import torch

from monet_models.latent_tokens import LatentTokens
from workers.rollout.latent_state import TEXT, LatentLayout, LatentStates

TOKENS = LatentTokens(start=7, pad=9, end=8, image_pad=5, video_pad=6, vision_start=3, vision_end=4, eos=2,
                      pad_token=0)


def layout(allow_latents=True, K=3):
    return LatentLayout(TOKENS, K, allow_latents, vocab_size=16, real_vocab_size=14)


def test_block_opens_feeds_k_latents_then_forces_the_end():
    states = LatentStates(layout(), batch_size=1)
    placed, fed = [], []
    for sampled in [11, 7, 2, 2, 2, 2, 12]:  # EOS (2) sampled inside the block must be ignored
        step = states.advance(torch.tensor([sampled]))
        placed.append(int(step.tokens))
        fed.append(bool(step.feed_latent))
    assert placed == [11, 7, 9, 9, 9, 8, 12]
    assert fed == [False, False, True, True, True, False, False]
    assert int(states.count) == TEXT


def test_masks_block_special_ids_in_text_and_allow_only_the_forced_token_in_blocks():
    states = LatentStates(layout(), batch_size=3)
    states.count = torch.tensor([TEXT, 1, 3])
    mask = states.logits_mask()
    assert mask[0].nonzero().flatten().tolist() == [3, 4, 5, 6, 8, 9, 14, 15]
    assert (~mask[1]).nonzero().flatten().tolist() == [TOKENS.pad]
    assert (~mask[2]).nonzero().flatten().tolist() == [TOKENS.end]
    assert states.forced_tokens().tolist() == [-1, TOKENS.pad, TOKENS.end]


def test_without_latents_the_start_token_is_blocked_and_never_opens_a_block():
    plain = layout(allow_latents=False)
    assert plain.blocked_in_text()[TOKENS.start]
    states = LatentStates(plain, batch_size=1)
    states.advance(torch.tensor([TOKENS.start]))
    assert int(states.count) == TEXT


def test_select_keeps_rows():
    states = LatentStates(layout(), batch_size=3)
    states.count = torch.tensor([TEXT, 2, 0])
    states.select(torch.tensor([2, 0]))
    assert states.count.tolist() == [0, TEXT]
