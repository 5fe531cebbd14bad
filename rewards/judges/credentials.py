"""Which provider an ``api_name`` selects, which environment variable holds its key, and start-up checks.

Keys are read from the environment at the moment a client is built and are never stored on our objects, so they
cannot leak through reprs, pickles, logs or the cache. ``redact`` (``common.secrets.mask_text``) scrubs them, and
any other secret, from text we log or raise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from common.secrets import mask_text as redact  # noqa: F401  (re-exported; common.secrets is the one home)

DEEPSEEK_BASE_URL = "https://api.deepseek.com"


class JudgeCredentialsError(RuntimeError):
    """An API judge is enabled but its key variable is not set."""


@dataclass(frozen=True)
class ProviderSpec:
    kind: str  # "gemini" | "openai"
    key_var: str
    base_url: str | None  # None: the SDK's default (or OPENAI_BASE_URL)


def provider_spec(api_name: str, api_base_url: str = "") -> ProviderSpec:
    """gemini-* → google-genai; deepseek-* → OpenAI SDK at DeepSeek; anything else → OpenAI SDK."""
    name = api_name.lower()
    if name.startswith("gemini"):
        return ProviderSpec("gemini", "GOOGLE_API_KEY", api_base_url or None)
    if name.startswith("deepseek"):
        return ProviderSpec("openai", "DEEPSEEK_API_KEY", api_base_url or DEEPSEEK_BASE_URL)
    return ProviderSpec("openai", "OPENAI_API_KEY", api_base_url or os.environ.get("OPENAI_BASE_URL") or None)


def check_judge_credentials(judge_config) -> None:
    """Refuse an enabled judge (``api_name`` set) whose key variable is unset; call this at trainer start-up."""
    api_name = getattr(judge_config, "api_name", "") or ""
    if not api_name:
        return
    spec = provider_spec(api_name, getattr(judge_config, "api_base_url", "") or "")
    if not os.environ.get(spec.key_var):
        raise JudgeCredentialsError(
            f"worker.rule_based_judge.api_name={api_name!r} needs the environment variable {spec.key_var}, which is "
            f"not set; export it (or set worker.rule_based_judge.api_name='' to judge by rules only)")

