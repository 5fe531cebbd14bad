"""Builds parquet files shaped like Kwai-Keye/Thyme-RL: `question` without `<image>` markers, `solution`, and the
image as a plain base64 string (`image`), a one-element list holding one (`images`) or a Hugging Face image dict.

Good rows carry noise images large enough that their base64 is longer than any path the OS accepts (the form that
used to crash the loader); bad rows carry one known skip reason each, so tests can check the skip summary.
"""
from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

FORMS = ("base64", "list", "dict")  # image column: plain base64 string | [base64 string] | {"bytes", "path"}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@dataclass(frozen=True)
class ThymeFile:
    path: Path
    image_key: str
    good: int
    bad: dict[str, int]  # skip reason -> row index of the bad row with that reason


def noisy_image(colour: str, seed: int, size: int = 160, fmt: str = "JPEG") -> bytes:
    """A colour with noise (so it does not compress to a few bytes), encoded as JPEG or PNG."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-25, 26, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG header claiming width x height pixels (over twice PIL's bomb limit) with almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _image_value(data: bytes | None, form: str):
    if data is None:
        return None
    text = base64.b64encode(data).decode()
    return {"base64": text, "list": [text], "dict": {"bytes": data, "path": None}}[form]


def _bad_rows() -> list[tuple[str, str, bytes | None]]:
    """(reason, question, image bytes) per bad row: null image, blank question, bomb, truncated JPEG."""
    return [("missing_image", "What colour is the shape?", None),
            ("empty_prompt", "   ", noisy_image("red", 99)),
            ("image_too_large", "What colour is the shape?", bomb_png()),
            ("corrupt_image", "What colour is the shape?", noisy_image("red", 98)[:300])]


def write_thyme_parquet(path: str | Path, form: str = "base64", good: int = 8, with_bad: bool = True) -> ThymeFile:
    """A Thyme-shaped parquet at `path`: `good` answerable rows, then (optionally) one bad row per skip reason."""
    path = Path(path)
    colours = list(COLOURS)
    questions, solutions, images, bad = [], [], [], {}
    for index in range(good):
        colour = colours[index % len(colours)]
        fmt = "JPEG" if index % 2 == 0 else "PNG"  # base64 starting /9j/ and iVBOR
        questions.append(f"What colour is the shape? Answer with one word. (item {index})")
        solutions.append(colour)
        images.append(_image_value(noisy_image(colour, index, fmt=fmt), form))
    for reason, question, data in _bad_rows() if with_bad else []:
        bad[reason] = len(questions)
        questions.append(question)
        solutions.append("red")
        images.append(_image_value(data, form))
    image_key = "images" if form == "list" else "image"
    pq.write_table(pa.table({"question": questions, "solution": solutions, image_key: images}), path)
    return ThymeFile(path, image_key, good, bad)
