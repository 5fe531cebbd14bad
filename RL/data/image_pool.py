"""A pool of unlabeled images for self-evolution (the proposer invents a question about each one).

Files are found by a recursive scan (optionally only in named first-level subfolders), sorted, and shuffled once
with the seed; `sample(t)` for step t is therefore a pure function of (files, seed, t), which makes resuming trivial.
A file that cannot be decoded is skipped (the next one is used) and counted. A pool with no image, or none that
decodes, is a `DataError` naming `data.image_dir`.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from PIL import Image

from RL.data.errors import DataError
from RL.data.images import CorruptImageError, MissingImageError, decode_image, fit_pixels
from common.seeding import derive_seed

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff")


@dataclass
class PoolImage:
    image: Image.Image
    path: str  # absolute
    relative_path: str  # relative to the pool root
    subfolder: str  # first-level subfolder, "" for files at the root
    index: int  # position in the shuffled order


class ImagePool:
    def __init__(self, data_dir: Union[str, Path], include_subfolders: Union[str, list[str], None] = None,
                 seed: int = 0, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None):
        self.root = Path(data_dir).expanduser().resolve()
        if not self.root.is_dir():
            raise DataError(f"data.image_dir: the image pool folder {self.root} does not exist; name the folder of "
                            "unlabeled images")
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        files = sorted(path for folder in self._folders(include_subfolders) for path in _scan(folder))
        if not files:
            raise DataError(f"data.image_dir: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}"
                            + (f" in the subfolders {include_subfolders} (data.include_subfolders)"
                               if include_subfolders else ""))
        self.files = files
        self.order = list(range(len(files)))
        random.Random(derive_seed(seed, "image_pool")).shuffle(self.order)
        self.corrupt: set[str] = set()

    def _folders(self, include_subfolders: Union[str, list[str], None]) -> list[Path]:
        names = include_subfolders.split(",") if isinstance(include_subfolders, str) else include_subfolders or []
        names = [name.strip() for name in names if name.strip()]
        if not names:
            return [self.root]
        missing = [name for name in names if not (self.root / name).is_dir()]
        if missing:
            logger.warning("image pool %s: subfolders %s do not exist and are ignored", self.root, missing)
        return [self.root / name for name in names if name not in missing]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_corrupt(self) -> int:
        return len(self.corrupt)

    def sample(self, step: int) -> PoolImage:
        """The image for step `step` (1-based; the order repeats every len(pool) steps); corrupt files are
        skipped in favour of the next one."""
        start = max(1, step) - 1
        for offset in range(len(self.files)):
            position = (start + offset) % len(self.files)
            path = self.files[self.order[position]]
            try:
                image = decode_image(path)
            except (CorruptImageError, MissingImageError) as error:
                if str(path) not in self.corrupt:
                    logger.warning("image pool: skipping unreadable %s (%s)", path, error)
                self.corrupt.add(str(path))
                continue
            return self._entry(image, path, position)
        raise DataError(f"data.image_dir: none of the {len(self.files)} image files under {self.root} can be "
                        "decoded")

    def _entry(self, image: Image.Image, path: Path, position: int) -> PoolImage:
        if self.min_pixels and self.max_pixels:
            image = fit_pixels(image, self.min_pixels, self.max_pixels)
        elif image.mode != "RGB":
            image = image.convert("RGB")
        relative = path.relative_to(self.root)
        subfolder = relative.parts[0] if len(relative.parts) > 1 else ""
        return PoolImage(image, str(path), str(relative), subfolder, position)


def _scan(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, skipping hidden files and hidden folders."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).parts
        if any(part.startswith(".") for part in relative) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(path)
    return found
