"""Seeds: the one place where a run's seed becomes the seeds of its parts (steps, retries, ranks, requests).

Derived seeds hash the parts with numpy's SeedSequence instead of adding magic offsets, so two different paths
(step 3 of rank 1 vs step 1 of rank 3) can never collide, and every stream is a pure function of the run's seed.
"""
from __future__ import annotations

import zlib

import numpy as np


def derive_seed(base: int, *parts: int | str) -> int:
    """A 31-bit seed determined by `base` and the labelled `parts` (ints or short strings)."""
    words = [int(base) & 0xFFFFFFFF, (int(base) >> 32) & 0xFFFFFFFF] + [_word(part) for part in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


def _word(part: int | str) -> int:
    return zlib.crc32(part.encode()) if isinstance(part, str) else int(part) & 0xFFFFFFFF
