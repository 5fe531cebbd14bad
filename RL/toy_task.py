"""A bundled toy visual task: one coloured shape on a two-tone background, short-answer questions about it.

It is generated deterministically from a seed, so nothing is downloaded. Each answer is visible in the *content* of
one image token of the tiny model (monet_models/tiny_model.py: a 56x56 image is 4 merged tokens, one per 28x28 cell),
not only in where that token sits, because the tiny model can barely tell image-token positions apart (its mRoPE
rotates neighbouring width positions by under 2e-4 rad):
- the shape is centred in one 28x28 cell (small jitter), so its outline falls on the same patches of one token;
- the two halves have different greys, so the token holding the shape also shows which side it is on.

`python -m tools.toy_task` writes it to a folder. With `sft=True`, `make_toy_dataset` also writes the latent-SFT rows
of the train split, whose auxiliary (Monet) or helper (Mirage) image is a zoomed view of the shape's cell:
`sft_monet.json` (Monet's interleaved chains: the zoom, an <observation> of it, the answer) and `sft_mirage.jsonl`
(Mirage's rows: the zoom as the helper image of one latent block). `corpus_lines` is the task's text, which the tiny
model's tokenizer is trained on.
"""
from __future__ import annotations

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
BACKGROUND = {"left": (245, 245, 245), "right": (170, 170, 170)}  # the two halves' greys (the side cue)
SHAPE_SIZES = (18, 24)  # side of the shape's box in pixels; a cell is IMAGE_SIZE // 2 = 28
JITTER = 2  # pixels the shape may move off its cell's centre


def draw_shape(colour: str, shape: str, side: str, rng: random.Random) -> Image.Image:
    """The shape, centred (± JITTER) in the top or bottom cell of its half, on that half's grey."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND["left"])
    draw = ImageDraw.Draw(image)
    half = IMAGE_SIZE // 2
    draw.rectangle((half, 0, IMAGE_SIZE, IMAGE_SIZE), fill=BACKGROUND["right"])
    size = rng.randint(*SHAPE_SIZES)
    margin = (half - size) // 2
    jitter = min(JITTER, margin)
    last = half - 1 - size  # PIL boxes include their end pixel: a shape starting later would touch the next cell
    x0 = min(last, margin + rng.randint(-jitter, jitter)) + (half if side == "right" else 0)
    y0 = min(last, margin + rng.randint(-jitter, jitter)) + rng.choice((0, half))
    box = (x0, y0, x0 + size, y0 + size)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + size // 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image


def make_rows(split: str, count: int, out: Path, rng: random.Random) -> list[dict]:
    """Rows of one split; each split's images go to their own folder (`images/<split>/`), so the train images
    alone can serve as an unlabeled pool while the val labels stay held out."""
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        colour, shape, side = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIDES)
        kind = rng.choice(list(QUESTIONS))
        name = f"images/{split}/{split}_{index:05d}.png"
        draw_shape(colour, shape, side, rng).save(out / name)
        facts = {"colour": colour, "shape": shape, "side": side}
        rows.append({"id": f"toy-{split}-{index:05d}", "problem": "<image>" + QUESTIONS[kind], "answer": facts[kind],
                     "images": [name], "kind": kind, "facts": facts})
    return rows


def selfplay_rows(rows: list[dict], proposer_template: str, solver_template: str, latent: bool) -> list[dict]:
    """Warm-start rows for the proposer–solver loop: each image once as a proposer prompt (target: a toy question
    in iReasoner's tags) and once per question kind as a solver prompt (target: one reasoning step and the tagged
    answer; every kind, so the warm start learns to read colour, shape and side from every image). The prompts are
    rendered from the same Jinja files the loop uses, so the two cannot drift apart."""
    from jinja2 import Template

    proposer, solver = Template(proposer_template), Template(solver_template)
    block = "<latent>" if latent else ""
    out = []
    for row in rows:
        question = row["problem"].replace("<image>", "")
        out.append({**row, "id": row["id"] + "-proposer", "problem": "<image>" + proposer.render(content=""),
                    "response": f"<question>{question}</question><rationale>It is visible.</rationale>"})
        for kind, answer in row["facts"].items():
            out.append({**row, "id": f"{row['id']}-solver-{kind}", "kind": kind, "answer": answer,
                        "problem": "<image>" + solver.render(content=QUESTIONS[kind]),
                        "response": f"{block}<think>Step 1: the {kind} is {answer}.</think><answer>{answer}</answer>"})
    return out


def zoom(image: Image.Image) -> Image.Image:
    """The 28x28 cell holding the shape, scaled to the whole image: what a crop tool would show."""
    greys = set(BACKGROUND.values())
    pixels = image.load()
    painted = [(x, y) for x in range(IMAGE_SIZE) for y in range(IMAGE_SIZE) if pixels[x, y] not in greys]
    cell = IMAGE_SIZE // 2
    column, row = painted[0][0] // cell, painted[0][1] // cell
    box = (column * cell, row * cell, (column + 1) * cell, (row + 1) * cell)
    return image.crop(box).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST)


def sft_rows(rows: list[dict], out: Path) -> tuple[list[dict], list[dict]]:
    """(Monet rows, Mirage rows) of `rows`, their zoomed images saved under images/aux/."""
    (out / "images" / "aux").mkdir(parents=True, exist_ok=True)
    monet, mirage = [], []
    for index, row in enumerate(rows):
        aux = f"images/aux/{Path(row['images'][0]).stem}_zoom.png"
        image = Image.open(out / row["images"][0]).convert("RGB")
        zoom(image).save(out / aux)
        colour, shape, side = (row["facts"][key] for key in ("colour", "shape", "side"))
        answer = f"The answer is \\boxed{{{row['answer']}}}."
        monet.append({"data": [
            {"role": "user", "content": [{"type": "image", "image": row["images"][0]},
                                         {"type": "text", "text": row["problem"].replace("<image>", "")}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "<abs_vis_token></abs_vis_token>"}, {"type": "image", "image": aux},
                {"type": "text", "text": f"<observation>a {colour} {shape} on the {side}</observation>{answer}"}]}],
            "metadata": {"dataset_name": "toy", "sample_id": index}})
        mirage.append({"text_input": row["problem"], "image_input": row["images"][0], "image_output": aux,
                       "text_output": f"<output_image>{answer}"})
    return monet, mirage


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def write_task(out: Path, make_rows, selfplay_rows, n_train: int, n_val: int, seed: int,
               selfplay_prompts: tuple[str, str] | None, latent: bool) -> dict[str, list[dict]]:
    """What every toy task writes: train.jsonl and val.jsonl (rows from `make_rows(split, count, out, rng)`, one
    seeded generator for both splits) and, with `selfplay_prompts`, selfplay_sft.jsonl from `selfplay_rows`. Returns
    the rows by split, for the task's own SFT rows."""
    rng = random.Random(seed)
    rows = {split: make_rows(split, count, out, rng) for split, count in (("train", n_train), ("val", n_val))}
    for split, split_rows in rows.items():
        write_jsonl(out / f"{split}.jsonl", split_rows)
    if selfplay_prompts:
        templates = [Path(path).read_text() for path in selfplay_prompts]
        write_jsonl(out / "selfplay_sft.jsonl", selfplay_rows(rows["train"], *templates, latent=latent))
    return rows


def make_toy_dataset(out_dir: str | Path, n_train: int = 512, n_val: int = 64, seed: int = 0,
                     selfplay_prompts: tuple[str, str] | None = None, latent: bool = True, sft: bool = False) -> Path:
    """Write train.jsonl, val.jsonl and images/<split>/ under `out_dir` (image paths relative to `out_dir`); with
    `selfplay_prompts` (proposer and solver Jinja files) also selfplay_sft.jsonl for the proposer–solver warm start;
    with `sft` the latent-SFT rows (module docstring)."""
    out = Path(out_dir)
    rows = write_task(out, make_rows, selfplay_rows, n_train, n_val, seed, selfplay_prompts, latent)
    if sft:
        monet, mirage = sft_rows(rows["train"], out)
        (out / "sft_monet.json").write_text(json.dumps(monet) + "\n")
        write_jsonl(out / "sft_mirage.jsonl", mirage)
    return out


def corpus_lines() -> list[str]:
    """Text of the toy task, used to train the tiny tokenizer so these words get compact tokens."""
    words = list(COLOURS) + list(SHAPES) + list(SIDES)
    lines = list(QUESTIONS.values()) + [f"The answer is \\boxed{{{word}}}." for word in words]
    tagged = [f"<question>{q}</question><rationale>It is visible.</rationale>" for q in QUESTIONS.values()]
    tagged += [f"<think>Step 1: the {kind} is {word}.</think><answer>{word}</answer>" for kind in QUESTIONS
               for word in words]
    return lines + tagged
