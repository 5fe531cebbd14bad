"""Chat clients behind one method, ``complete(system, user) -> str``: google-genai for gemini-*, the OpenAI SDK else.

SDK-internal retries are off (our retry policy owns them, honouring ``Retry-After``), the per-call timeout is set on
the client, and the key is read from the environment only when the client is built.
"""
from __future__ import annotations

import os
import threading
from typing import Any

from .credentials import JudgeCredentialsError, provider_spec

_GEMINI_KWARG_NAMES = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens"}


def _key(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise JudgeCredentialsError(f"the API judge needs the environment variable {var}, which is not set")
    return value


class _Provider:
    """One SDK client per provider, built once under a lock: a second client racing in would be garbage-collected
    and close the HTTP connection pool under a thread still using it."""

    def __init__(self, model: str, key_var: str, base_url: str | None, timeout_s: float, api_kwargs: dict[str, Any]):
        self.model, self.key_var, self.base_url = model, key_var, base_url
        self.timeout_s, self.api_kwargs = timeout_s, dict(api_kwargs)
        self._client = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_lock")}

    def __setstate__(self, state):
        self.__init__(state["model"], state["key_var"], state["base_url"], state["timeout_s"], state["api_kwargs"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r})"

    def _get_client(self):
        with self._lock:
            if self._client is None:
                self._client = self._build_client()
            return self._client

    def _build_client(self):
        raise NotImplementedError


class OpenAIChatProvider(_Provider):
    """OpenAI chat-completions protocol (OpenAI, DeepSeek, vLLM/gateway endpoints)."""

    def _build_client(self):
        from openai import OpenAI

        return OpenAI(api_key=_key(self.key_var), base_url=self.base_url, timeout=self.timeout_s, max_retries=0)

    def complete(self, system: str, user: str) -> str | None:
        response = self._get_client().chat.completions.create(
            model=self.model, messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            **self.api_kwargs)
        if not response.choices:
            return None
        return response.choices[0].message.content


class GeminiProvider(_Provider):
    """Gemini generateContent through google-genai; ``config=`` is keyword-only (Monet passed ``generation_config=``)."""

    def _build_client(self):
        from google import genai
        from google.genai import types

        options = types.HttpOptions(base_url=self.base_url, api_version="v1beta",
                                    timeout=max(1, int(self.timeout_s * 1000)),
                                    retry_options=types.HttpRetryOptions(attempts=1))
        return genai.Client(api_key=_key(self.key_var), http_options=options)

    def _config(self, system: str):
        from google.genai import types

        kwargs = {_GEMINI_KWARG_NAMES.get(k, k): v for k, v in self.api_kwargs.items()}
        kwargs.setdefault("top_p", 1.0)
        kwargs.setdefault("automatic_function_calling", types.AutomaticFunctionCallingConfig(disable=True))
        return types.GenerateContentConfig(system_instruction=system, **kwargs)

    def complete(self, system: str, user: str) -> str | None:
        response = self._get_client().models.generate_content(model=self.model, contents=user,
                                                              config=self._config(system))
        return response.text


def make_provider(api_name: str, api_base_url: str = "", timeout_s: float = 60.0,
                  api_kwargs: dict[str, Any] | None = None):
    """The provider ``api_name`` selects, with ``api_base_url`` overriding its endpoint."""
    spec = provider_spec(api_name, api_base_url)
    cls = GeminiProvider if spec.kind == "gemini" else OpenAIChatProvider
    return cls(api_name, spec.key_var, spec.base_url, timeout_s, dict(api_kwargs or {}))
