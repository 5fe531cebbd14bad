"""The pointer task: a two-hop toy visual question whose answer needs an intermediate visual step.

A 56x56 image is a 2x2 grid of 28x28 cells, one merged image token of the tiny model each
(monet_models/tiny_model.py). Every cell has its own grey (so a token's *content* says which cell it is: the tiny
model's mRoPE barely tells image-token positions apart). One cell holds a black arrow pointing at another cell; the
other three hold blobs of three different colours. The question is always "What colour is the cell the arrow points
to?", so reading the colours alone gives one chance in three: the model has to find the arrow, follow it to its
target cell (hop 1) and read that cell's colour (hop 2).

The latent-SFT rows (`sft=True`) make the target cell the intermediate visual evidence:
- Monet (`sft_monet.json`): main image -> latent block with the auxiliary image = the TARGET cell zoomed to the whole
  image -> `<observation>a red blob</observation>` -> the answer. The observation names only what the zoom shows,
  never where the arrow points, so no text chain can do the hop in words: it has to happen in the latents (stage 2
  distils the zoom into them, stage 3 teaches the student to compute them from the main image alone).
- Mirage (`sft_mirage.jsonl`): the zoomed target cell as the helper image of one latent block.
- Text-only (`sft_text.json`): the same Monet rows without the block and the zoom, the arm latent SFT is compared
  with (examples/latent_evidence.sh).
- RL rows (`train.jsonl`, `val.jsonl`): the question and the colour.
- With `selfplay_prompts`, the proposer–solver warm start (`selfplay_sft.jsonl`, as the shape task writes it): each
  image once as a proposer prompt (target: the pointer question) and once as a solver prompt (target: a latent
  block, one step, the tagged colour).

The words are the shape task's (RL/toy_task.py `corpus_lines`), so the tiny model's tokenizer needs no change.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from RL.toy_task import COLOURS, IMAGE_SIZE, write_jsonl, write_task

QUESTION = "What colour is the cell the arrow points to?"
CELL = IMAGE_SIZE // 2
CELLS = ((0, 0), (1, 0), (0, 1), (1, 1))  # (column, row) in raster order: the order of the image tokens
TINTS = ((245, 245, 245), (195, 195, 195), (145, 145, 145), (95, 95, 95))  # each cell's grey, its identity cue
ARROW = (0, 0, 0)
BLOB_SIZES = (14, 20)
JITTER = 2


def draw_arrow(draw: ImageDraw.ImageDraw, cell: tuple[int, int], target: tuple[int, int]) -> None:
    """A thick arrow across `cell`, its head towards `target` (horizontal, vertical or diagonal)."""
    dx, dy = target[0] - cell[0], target[1] - cell[1]
    cx, cy = cell[0] * CELL + CELL // 2, cell[1] * CELL + CELL // 2
    reach = 9 if dx and dy else 11
    tip = (cx + dx * reach, cy + dy * reach)
    tail = (cx - dx * reach, cy - dy * reach)
    draw.line([tail, tip], fill=ARROW, width=4)
    # the head: a triangle whose base is perpendicular to the shaft, 7 px behind the tip
    norm = (dx * dx + dy * dy) ** 0.5
    ux, uy = dx / norm, dy / norm
    base = (tip[0] - 7 * ux, tip[1] - 7 * uy)
    draw.polygon([tip, (base[0] - 6 * uy, base[1] + 6 * ux), (base[0] + 6 * uy, base[1] - 6 * ux)], fill=ARROW)


def draw_blob(draw: ImageDraw.ImageDraw, cell: tuple[int, int], colour: str, rng: random.Random) -> None:
    size = rng.randint(*BLOB_SIZES)
    margin = (CELL - size) // 2
    x0 = cell[0] * CELL + margin + rng.randint(-JITTER, JITTER)
    y0 = cell[1] * CELL + margin + rng.randint(-JITTER, JITTER)
    draw.ellipse((x0, y0, x0 + size, y0 + size), fill=COLOURS[colour])


def draw_pointer(arrow: int, target: int, colours: dict[int, str], rng: random.Random) -> Image.Image:
    """The grid: tinted cells, the arrow in cell `arrow` pointing at cell `target`, a blob in every other cell."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    draw = ImageDraw.Draw(image)
    for index, (column, row) in enumerate(CELLS):
        draw.rectangle((column * CELL, row * CELL, (column + 1) * CELL - 1, (row + 1) * CELL - 1), fill=TINTS[index])
    draw_arrow(draw, CELLS[arrow], CELLS[target])
    for index, colour in colours.items():
        draw_blob(draw, CELLS[index], colour, rng)
    return image


def zoom_cell(image: Image.Image, index: int) -> Image.Image:
    """Cell `index` scaled to the whole image: what a crop tool pointed at the arrow's target would show."""
    column, row = CELLS[index]
    box = (column * CELL, row * CELL, (column + 1) * CELL, (row + 1) * CELL)
    return image.crop(box).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST)


def make_rows(split: str, count: int, out: Path, rng: random.Random) -> list[dict]:
    """Rows of one split, images under images/<split>/ (as the shape task, so the train images can be a pool)."""
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        arrow = rng.randrange(len(CELLS))
        others = [cell for cell in range(len(CELLS)) if cell != arrow]
        target = rng.choice(others)
        colours = dict(zip(others, rng.sample(list(COLOURS), len(others))))
        name = f"images/{split}/{split}_{index:05d}.png"
        draw_pointer(arrow, target, colours, rng).save(out / name)
        facts = {"arrow": arrow, "target": target, "colour": colours[target]}
        rows.append({"id": f"pointer-{split}-{index:05d}", "problem": "<image>" + QUESTION,
                     "answer": colours[target], "images": [name], "kind": "pointer", "facts": facts})
    return rows


def monet_row(row: dict, aux: str | None, index: int) -> dict:
    """A Monet chain: with `aux`, a latent block whose auxiliary image is the zoomed target; without, text only."""
    text = f"<observation>a {row['answer']} blob</observation>The answer is \\boxed{{{row['answer']}}}."
    response = [{"type": "text", "text": text}]
    if aux is not None:
        response = [{"type": "text", "text": "<abs_vis_token></abs_vis_token>"}, {"type": "image", "image": aux},
                    *response]
    return {"data": [{"role": "user", "content": [{"type": "image", "image": row["images"][0]},
                                                  {"type": "text", "text": QUESTION}]},
                     {"role": "assistant", "content": response}],
            "metadata": {"dataset_name": "pointer", "sample_id": index}}


def sft_rows(rows: list[dict], out: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(Monet rows, Mirage rows, text-only rows) of `rows`, the zoomed targets saved under images/aux/."""
    (out / "images" / "aux").mkdir(parents=True, exist_ok=True)
    monet, mirage, text = [], [], []
    for index, row in enumerate(rows):
        aux = f"images/aux/{Path(row['images'][0]).stem}_zoom.png"
        zoom_cell(Image.open(out / row["images"][0]).convert("RGB"), row["facts"]["target"]).save(out / aux)
        monet.append(monet_row(row, aux, index))
        text.append(monet_row(row, None, index))
        mirage.append({"text_input": row["problem"], "image_input": row["images"][0], "image_output": aux,
                       "text_output": f"<output_image>The answer is \\boxed{{{row['answer']}}}."})
    return monet, mirage, text


def selfplay_rows(rows: list[dict], proposer_template: str, solver_template: str, latent: bool) -> list[dict]:
    """Warm-start rows of the proposer–solver loop, rendered from the loop's own Jinja files (module docstring)."""
    from jinja2 import Template

    proposer, solver = Template(proposer_template), Template(solver_template)
    block = "<latent>" if latent else ""
    out = []
    for row in rows:
        out.append({**row, "id": row["id"] + "-proposer", "problem": "<image>" + proposer.render(content=""),
                    "response": f"<question>{QUESTION}</question><rationale>Follow the arrow.</rationale>"})
        out.append({**row, "id": row["id"] + "-solver", "problem": "<image>" + solver.render(content=QUESTION),
                    "response": f"{block}<think>Step 1: the colour is {row['answer']}.</think>"
                                f"<answer>{row['answer']}</answer>"})
    return out


def make_pointer_dataset(out_dir: str | Path, n_train: int = 512, n_val: int = 64, seed: int = 0,
                         selfplay_prompts: tuple[str, str] | None = None, latent: bool = True,
                         sft: bool = False) -> Path:
    """Write train.jsonl, val.jsonl and images/<split>/ under `out_dir`; with `selfplay_prompts` (proposer and
    solver Jinja files) also selfplay_sft.jsonl; with `sft` the latent-SFT rows and the text-only rows (module
    docstring). The arguments are `RL.toy_task.make_toy_dataset`'s."""
    out = Path(out_dir)
    rows = write_task(out, make_rows, selfplay_rows, n_train, n_val, seed, selfplay_prompts, latent)
    if sft:
        monet, mirage, text = sft_rows(rows["train"], out)
        (out / "sft_monet.json").write_text(json.dumps(monet) + "\n")
        (out / "sft_text.json").write_text(json.dumps(text) + "\n")
        write_jsonl(out / "sft_mirage.jsonl", mirage)
    return out
