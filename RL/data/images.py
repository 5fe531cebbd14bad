"""Decoding every image form a data set may hold, and resizing into the pixel range the processor expects.

Forms: PIL images, raw bytes, base64 strings (with or without a `data:image/...;base64,` prefix), dicts with
`bytes`/`path` (the Hugging Face Image feature), and paths relative to the image folder. Errors are typed so the
dataset can count them: `MissingImageError` (no such file) and `CorruptImageError` (undecodable data).
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
from pathlib import Path
from typing import Any, Optional

from PIL import Image

_BASE64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}$")


class MissingImageError(FileNotFoundError):
    """An image path that does not exist."""


class CorruptImageError(ValueError):
    """Image data that PIL cannot decode (truncated, not an image, bad base64)."""


def as_image_list(value: Any) -> list:
    """The images of a row as a list: one image, a list, an array from parquet, or nothing."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, (bytes, Image.Image)):
        return list(value.tolist())
    return [value]


def decode_image(value: Any, image_dir: Optional[str | Path] = None) -> Image.Image:
    """One image from any supported form, fully decoded (so truncation is caught here, not in training)."""
    if isinstance(value, Image.Image):
        return _loaded(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(value))
    if isinstance(value, dict):
        if value.get("bytes"):
            return _open_bytes(value["bytes"])
        if value.get("path"):
            return _open_path(value["path"], image_dir)
        raise CorruptImageError("image dict without bytes or path")
    if isinstance(value, Path):
        return _open_path(value, image_dir)
    if isinstance(value, str):
        return _open_string(value, image_dir)
    raise CorruptImageError(f"unsupported image type {type(value).__name__}")


def _open_string(value: str, image_dir: Optional[str | Path]) -> Image.Image:
    if value.startswith("data:image"):
        return _open_bytes(_b64(value.split(",", 1)[-1]))
    path = _resolve(value, image_dir)
    if path.is_file():
        return _open_path(path, None)
    if len(value) >= 64 and _BASE64.match(value[:4096]):
        return _open_bytes(_b64(value))
    raise MissingImageError(f"no such image file: {path}")


def _resolve(value: str | Path, image_dir: Optional[str | Path]) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() or image_dir is None else Path(image_dir) / path


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as error:
        raise CorruptImageError(f"bad base64 image: {error}") from None


def _open_path(value: str | Path, image_dir: Optional[str | Path]) -> Image.Image:
    path = _resolve(value, image_dir)
    if not path.is_file():
        raise MissingImageError(f"no such image file: {path}")
    try:
        with Image.open(path) as image:
            return _loaded(image)
    except CorruptImageError:
        raise
    except Exception as error:  # PIL raises many types for bad files
        raise CorruptImageError(f"cannot decode {path}: {error}") from None


def _open_bytes(data: bytes) -> Image.Image:
    try:
        return _loaded(Image.open(io.BytesIO(data)))
    except CorruptImageError:
        raise
    except Exception as error:
        raise CorruptImageError(f"cannot decode image bytes: {error}") from None


def _loaded(image: Image.Image) -> Image.Image:
    try:
        image.load()
    except Exception as error:
        raise CorruptImageError(f"cannot decode image: {error}") from None
    if image.width < 1 or image.height < 1:
        raise CorruptImageError("empty image")
    return image


def fitted_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled by area into [min_pixels, max_pixels], aspect ratio kept."""
    area = width * height
    if area > max_pixels:
        factor = math.sqrt(max_pixels / area)
        return max(1, int(width * factor)), max(1, int(height * factor))
    if area < min_pixels:  # round up so the upscaled image is not left just below the floor
        factor = math.sqrt(min_pixels / area)
        return max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))
    return width, height


def fit_pixels(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Scale by area into [min_pixels, max_pixels] and convert to RGB, as EasyR1 does."""
    size = fitted_size(image.width, image.height, min_pixels, max_pixels)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(value: Any, image_dir: Optional[str | Path], min_pixels: int, max_pixels: int) -> Image.Image:
    """Decode, fit into the pixel range, RGB."""
    return fit_pixels(decode_image(value, image_dir), min_pixels, max_pixels)
