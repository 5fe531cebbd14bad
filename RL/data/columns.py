"""Checking a source's columns against the configured keys before any row is read.

A wrong key would otherwise skip every row (`missing_key`, or `corrupt_image` for an image key naming a column of
numbers) and surface as "no usable rows"; refused here, the message names the key, the column and what to set.
"""
from __future__ import annotations

from typing import Any, Optional

from datasets import Value

from RL.data.errors import DataError
from RL.data.fields import shorten
from RL.data.sources import Source

IMAGE_VALUE_TYPES = ("string", "large_string", "binary", "large_binary", "null")  # paths, base64, bytes, nothing
IMAGE_FORMS = "paths, bytes, base64 strings or Hugging Face Image dicts"


def check_columns(source: Source, options: Any, where: str) -> None:
    """Refuse a prompt/answer key `source` lacks, and an image key naming a missing or non-image column.

    `options` has prompt_key, answer_key and image_key (the data config); `where` (the files' config key) starts
    every message."""
    columns = source.rows.column_names
    for option in ("prompt_key", "answer_key"):
        key = getattr(options, option)
        if key not in columns:
            raise DataError(f"{where} {source.name}: no column {key!r} (data.{option}); "
                            f"its columns: {shorten(columns, 200)}")
    image_key = options.image_key
    if image_key not in columns:
        other = next((name for name in ("images", "image") if name in columns), None)
        if other:
            raise DataError(f"{where} {source.name}: no column {image_key!r} (data.image_key) but a column "
                            f"{other!r}: set data.image_key={other}")
        return
    wrong = non_image_type(source.rows.features[image_key])
    if wrong:
        raise DataError(f"{where} {source.name}: column {image_key!r} (data.image_key) holds {wrong} values, not "
                        f"images ({IMAGE_FORMS}); set data.image_key to the image column (its columns: "
                        f"{shorten(columns, 200)})")


def non_image_type(feature: Any) -> Optional[str]:
    """The type of a `datasets` column that cannot hold images ('int64', 'list of bool'), else None.

    Lists are looked into (one image or a list of them); an Image feature or a struct with `bytes` or `path` (an HF
    Image dict) can."""
    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
    if inner is not None:
        wrong = non_image_type(inner)
        return f"list of {wrong}" if wrong else None
    if isinstance(feature, Value) and feature.dtype not in IMAGE_VALUE_TYPES:
        return feature.dtype
    if isinstance(feature, dict) and not {"bytes", "path"} & feature.keys():
        return f"struct {{{', '.join(feature)}}}"
    return None
