"""What the embedded default's learning curve rests on (README section 2).

The tiny model can hardly tell its 4 merged image tokens apart by position, so every answer of the toy task must be
visible in the content of one token: the shape inside one 28x28 cell, on its half's own grey. And the warm start's
`sft.freeze_vision_tower` must leave the vision tower untouched while the language model trains.
"""
import random

import pytest
import torch

from RL.toy_task import BACKGROUND, COLOURS, IMAGE_SIZE, SHAPES, SIDES, draw_shape

CELL = IMAGE_SIZE // 2  # one merged image token of the tiny model (2x2 patches of 14 px)


def test_each_answer_is_in_the_content_of_one_image_token():
    rng = random.Random(0)
    greys = set(BACKGROUND.values())
    for _ in range(300):
        colour, shape, side = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIDES)
        pixels = draw_shape(colour, shape, side, rng).load()
        painted = {(x, y) for x in range(IMAGE_SIZE) for y in range(IMAGE_SIZE) if pixels[x, y] not in greys}
        cells = {(x // CELL, y // CELL) for x, y in painted}
        assert len(cells) == 1, f"{shape} spans image tokens {cells}"
        (column, row), = cells
        assert column == SIDES.index(side)  # left half = column 0
        assert any(pixels[x, y] == COLOURS[colour] for x, y in painted)
        background = {pixels[x, y] for x in range(column * CELL, (column + 1) * CELL)
                      for y in range(row * CELL, (row + 1) * CELL)} & greys
        assert background == {BACKGROUND[side]}, "the shape's own token shows which half it is on"
    assert BACKGROUND["left"] != BACKGROUND["right"]


@pytest.mark.slow  # a latent SFT on Ray
def test_sft_can_freeze_the_vision_tower(tiny_model_dir, toy_data_dir, tmp_path):
    from safetensors.torch import load_file

    from RL.config import load_config
    from RL.train_sft import run_sft

    config = load_config([
        "config=examples/config/vlpo_tiny_cpu.yaml", f"worker.actor.model.model_path={tiny_model_dir}",
        f"data.train_files={toy_data_dir}/train.jsonl", "worker.rollout.latent_size=2", "sft.steps=2",
        "sft.batch_size=2", "sft.lr=1e-2", "sft.freeze_vision_tower=true", f"sft.output_dir={tmp_path / 'sft'}"])
    before = load_file(f"{tiny_model_dir}/model.safetensors")
    after = load_file(f"{run_sft(config)}/model.safetensors")
    visual = [name for name in before if "visual" in name]
    language = [name for name in before if "visual" not in name]
    assert visual and all(torch.equal(before[name], after[name]) for name in visual)
    assert any(not torch.equal(before[name], after[name]) for name in language)
