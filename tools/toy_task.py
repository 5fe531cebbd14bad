"""A bundled toy visual task: one coloured shape on a plain background, short-answer questions about it.

It has enough structure for a tiny model to learn (colour, shape and side are all visible in the pixels) and is
generated deterministically from a seed, so nothing is downloaded.

    python -m tools.toy_task --out examples/toy_data/generated --train 512 --val 64
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "Which shape is in the image?",
    "side": "Is the shape on the left or the right?",
}
IMAGE_SIZE = 56


def draw_shape(colour: str, shape: str, side: str, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    half = IMAGE_SIZE // 2
    size = rng.randint(14, 20)
    x0 = rng.randint(2, half - size - 2) + (half if side == "right" else 0)
    y0 = rng.randint(4, IMAGE_SIZE - size - 4)
    box = (x0, y0, x0 + size, y0 + size)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + size // 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image


def make_rows(split: str, count: int, image_dir: Path, rng: random.Random) -> list[dict]:
    rows = []
    for index in range(count):
        colour, shape, side = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIDES)
        kind = rng.choice(list(QUESTIONS))
        name = f"{split}_{index:05d}.png"
        draw_shape(colour, shape, side, rng).save(image_dir / name)
        answer = {"colour": colour, "shape": shape, "side": side}[kind]
        rows.append({"id": f"toy-{split}-{index:05d}", "problem": "<image>" + QUESTIONS[kind], "answer": answer,
                     "images": [f"images/{name}"], "kind": kind})
    return rows


def make_toy_dataset(out_dir: str | Path, n_train: int = 512, n_val: int = 64, seed: int = 0) -> Path:
    """Write train.jsonl, val.jsonl and images/ under `out_dir`; image paths are relative to `out_dir`."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        rows = make_rows(split, count, out / "images", rng)
        with open(out / f"{split}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return out


def corpus_lines() -> list[str]:
    """Text of the toy task, used to train the tiny tokenizer so these words get compact tokens."""
    words = list(COLOURS) + list(SHAPES) + list(SIDES)
    lines = list(QUESTIONS.values()) + [f"The answer is \\boxed{{{word}}}." for word in words]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_toy_dataset(args.out, args.train, args.val, args.seed))


if __name__ == "__main__":
    main()
