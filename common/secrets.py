"""The one home of secret handling: which keys, values and strings are secrets, and how they are masked.

Everything written or shown (config.yaml, metrics, generations, console, wandb, tensorboard, error messages) passes
through here. Secrets are caught three ways, because a key can reach a log under any name: by the key's name
(`api_key`, `hf_token` ...), by value (the value of a secret environment variable or of a secret config key, wherever
it shows up) and by shape (`sk-...`, `AIza...`, `Bearer ...`, `user:password@` in URLs). Light: no torch import.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterable

MASK = "***"
# Read by the judges, trackers and hubs; listed so they are masked even if the name rule below changes.
SECRET_ENV_VARS = ("GOOGLE_API_KEY", "GEMINI_API_KEY", "DEEPSEEK_API_KEY", "OPENAI_API_KEY", "WANDB_API_KEY",
                   "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "ANTHROPIC_API_KEY")
# data column names and a reward component's name (algorithm.filter_key) end in "_key"
NOT_SECRET = frozenset({"prompt_key", "answer_key", "image_key", "filter_key"})
SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"})
MIN_VALUE_LENGTH = 8  # shorter values ("1", "true") would garble every log if masked by value
SECRET_SHAPES = (
    (re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{12,}"), MASK),  # OpenAI, Anthropic, DeepSeek
    (re.compile(r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_-]{16,}"), MASK),  # Google
    (re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{16,}"), MASK),  # Hugging Face
    (re.compile(r"\b(Bearer\s+)[A-Za-z0-9._~+/=-]{12,}", re.IGNORECASE), r"\1" + MASK),
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s:@]*:[^/\s@]+@"), r"\1" + MASK + "@"),  # user:password@host
)


def is_secret_key(name: Any) -> bool:
    """api_key, hf_token, client_secret, password, accesstoken, GOOGLE_API_KEY ... but not max_tokens,
    tokenizer_path or prompt_key: whole words, or words ending in key/token."""
    lowered = str(name).lower()
    if lowered in NOT_SECRET:
        return False
    words = [word for word in re.split(r"[^a-z0-9]+", lowered) if word]
    return (bool(set(words) & SECRET_WORDS) or any(word.endswith(("key", "token")) for word in words)
            or any(part in lowered for part in ("secret", "password", "apikey")))


def env_secret_values() -> set[str]:
    """Values of the known key variables and of every environment variable whose name looks secret (read now)."""
    return {value for name, value in os.environ.items()
            if (name in SECRET_ENV_VARS or is_secret_key(name)) and len(value) >= MIN_VALUE_LENGTH}


def secret_values(tree: Any) -> set[str]:
    """String values of secret-named keys in `tree`, to be masked wherever they show up later."""
    found: set[str] = set()
    if isinstance(tree, dict):
        for key, value in tree.items():
            if is_secret_key(key) and isinstance(value, str) and len(value) >= MIN_VALUE_LENGTH:
                found.add(value)
            else:
                found |= secret_values(value)
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            found |= secret_values(item)
    return found


def mask_text(text: Any, values: Iterable[str] = ()) -> str:
    """`text` with every secret value (environment, `values`) and every key-shaped string replaced by ***."""
    return _mask(str(text), _longest_first(env_secret_values() | set(values)))


def redact(tree: Any, values: Iterable[str] = ()) -> Any:
    """A copy of `tree` with the text values of secret-named keys replaced by *** (a number or a flag is never a
    secret: `ppo_max_token_len_per_gpu` stays a number the config can be loaded from) and every string masked as by
    `mask_text`.

    `values` are extra secret values (e.g. `secret_values(config)`). The input is not modified.
    """
    return _redact(tree, _longest_first(env_secret_values() | set(values)))


def _longest_first(values: set[str]) -> tuple[str, ...]:
    """A secret containing another is replaced whole before the shorter one can cut it into leaking halves."""
    return tuple(sorted(values, key=len, reverse=True))


def _mask(text: str, values: tuple[str, ...]) -> str:
    for value in values:
        text = text.replace(value, MASK)
    for pattern, replacement in SECRET_SHAPES:
        text = pattern.sub(replacement, text)
    return text


def _redact(tree: Any, values: tuple[str, ...]) -> Any:
    if isinstance(tree, dict):
        return {key: (MASK if is_secret_key(key) and isinstance(value, (str, list, tuple)) and value
                      else _redact(value, values)) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_redact(item, values) for item in tree]
    if isinstance(tree, str):
        return _mask(tree, values)
    return tree
