"""Decoding every image form a data set may hold, and resizing into the pixel range the processor expects.

Forms: PIL images, raw bytes, base64 strings (with or without a `data:image/...;base64,` prefix; Thyme-RL stores
plain ones), dicts with `bytes`/`path` (the Hugging Face Image feature), and paths relative to the image folder.
A string is a path only when it is short enough to be one and names an existing file; any other string is base64,
so the order never depends on what the file system says about a 200 KB "file name". Errors are typed so the dataset
can count them: `MissingImageError`, `CorruptImageError` and `ImageTooLargeError` (a decompression bomb or more than
the pixel cap); their messages never quote more than a few dozen characters of the value.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image

from RL.data.fields import shorten

MAX_PATH_CHARS = 1024  # longer strings are never stat'ed as paths (the OS refuses them with ENAMETOOLONG)
PATH_CHARS = 160  # an image path in a message: long enough to keep its end (the file name) on ordinary paths
MIN_BASE64_CHARS = 64  # shorter base64-looking strings are more likely a missing path ("img001") than an image
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold
_BASE64 = re.compile(r"^[A-Za-z0-9+/_\-\s]+={0,2}\s*$")
_BASE64_IMAGE_PREFIXES = (b"/9j/", b"iVBORw0KGgo", b"R0lGOD", b"UklGR", b"Qk", b"SUkq", b"TU0A")


class MissingImageError(FileNotFoundError):
    """An image path that does not exist."""


class CorruptImageError(ValueError):
    """Image data that PIL cannot decode (truncated, not an image, bad base64)."""


class ImageTooLargeError(ValueError):
    """An image with more pixels than the cap: decoding it could exhaust memory (a decompression bomb)."""


def as_image_list(value: Any) -> list:
    """The images of a row as a list: one image, a list, an array from parquet, or nothing."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, (bytes, Image.Image)):
        return list(value.tolist())
    return [value]


def decode_image(value: Any, image_dir: Optional[str | Path] = None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """One image from any supported form, fully decoded (so truncation is caught here, not in training)."""
    if isinstance(value, Image.Image):
        return _loaded(_capped(value, max_pixels))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(value), max_pixels)
    if isinstance(value, dict):
        if value.get("bytes"):
            return decode_image(value["bytes"], image_dir, max_pixels)
        if value.get("path"):
            return decode_image(str(value["path"]), image_dir, max_pixels)
        raise CorruptImageError("image dict without bytes or path")
    if isinstance(value, Path):  # a path only, never base64
        path = _existing_file(str(value), image_dir)
        if path is None:
            raise _missing(str(value), image_dir)
        return _open_path(path, max_pixels)
    if isinstance(value, str):
        return _open_string(value.strip(), image_dir, max_pixels)
    raise CorruptImageError(f"unsupported image type {type(value).__name__}")


def _open_string(text: str, image_dir: Optional[str | Path], max_pixels: int) -> Image.Image:
    """`data:` URI, else an existing short path, else base64 (long or base64-looking), else a missing path."""
    if text.startswith("data:"):
        return _open_bytes(_b64(text.partition(",")[2]), max_pixels)
    path = _existing_file(text, image_dir)
    if path is not None:
        return _open_path(path, max_pixels)
    if len(text) > MAX_PATH_CHARS or (len(text) >= MIN_BASE64_CHARS and _BASE64.match(text[:4096])):
        return _open_bytes(_b64(text), max_pixels)
    raise _missing(text, image_dir)


def _missing(text: str, image_dir: Optional[str | Path]) -> MissingImageError:
    return MissingImageError(f"no such image file: {shorten(str(_resolve(text, image_dir)), PATH_CHARS)}")


def _existing_file(text: str, image_dir: Optional[str | Path]) -> Optional[Path]:
    """The file `text` names, if it is short enough to be a path and exists; stat errors mean "not a file"."""
    if len(text) > MAX_PATH_CHARS or "\n" in text:
        return None
    path = _resolve(text, image_dir)
    try:
        return path if path.is_file() else None
    except (OSError, ValueError):  # a component over NAME_MAX, a NUL byte: not a path
        return None


def _resolve(value: str | Path, image_dir: Optional[str | Path]) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() or image_dir is None else Path(image_dir) / path


def _b64(text: str) -> bytes:
    compact = re.sub(r"\s+", "", text).translate(str.maketrans("-_", "+/"))
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as error:
        raise CorruptImageError(f"not an image path and not valid base64 ({error})") from None


def _open_path(path: Path, max_pixels: int) -> Image.Image:
    with _opened(lambda: Image.open(path), shorten(str(path), PATH_CHARS)) as image:
        return _loaded(_capped(image, max_pixels))


def _open_bytes(data: bytes, max_pixels: int) -> Image.Image:
    if data.startswith(_BASE64_IMAGE_PREFIXES) and _BASE64.match(data[:4096].decode("latin-1")):
        data = _b64(data.decode("ascii", errors="replace"))  # base64 text stored in a binary column
    return _loaded(_capped(_opened(lambda: Image.open(io.BytesIO(data)), "image bytes"), max_pixels))


def _opened(open_image: Callable[[], Image.Image], what: str) -> Image.Image:
    """PIL's open (header only), with its many exception types sorted into ours."""
    try:
        return open_image()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(f"{what}: {shorten(str(error))}") from None
    except Exception as error:  # PIL raises many types for bad data
        raise CorruptImageError(f"cannot decode {what}: {shorten(str(error))}") from None


def _capped(image: Image.Image, max_pixels: int) -> Image.Image:
    """Refuse an image over the pixel cap before its pixels are decoded."""
    if max_pixels and image.width * image.height > max_pixels:
        raise ImageTooLargeError(f"{image.width}x{image.height} = {image.width * image.height} pixels "
                                 f"> cap {max_pixels}")
    return image


def _loaded(image: Image.Image) -> Image.Image:
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(shorten(str(error))) from None
    except Exception as error:
        raise CorruptImageError(f"cannot decode image: {shorten(str(error))}") from None
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


def load_image(value: Any, image_dir: Optional[str | Path], min_pixels: int, max_pixels: int,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode (refusing more than `max_image_pixels`), fit into [min_pixels, max_pixels], RGB."""
    return fit_pixels(decode_image(value, image_dir, max_image_pixels), min_pixels, max_pixels)
