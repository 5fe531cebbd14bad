"""Format reward: did the model put its final answer in ``\\boxed{...}`` (Monet's 0.1-weighted term)."""
from __future__ import annotations

import re

from .answer import normalize_tag_spaces, strip_latents

_BOXED_RE = re.compile(r"\\boxed\s*\{.*\}", re.DOTALL)


def boxed_format_reward(response: str) -> float:
    """1.0 when the response contains a complete ``\\boxed{...}``, else 0.0."""
    text = normalize_tag_spaces(strip_latents(response))
    return 1.0 if _BOXED_RE.search(text) else 0.0
