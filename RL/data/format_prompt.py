"""Turning a question with `<image>` markers into the chat-templated prompt text the model and vLLM see."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from jinja2 import Environment, StrictUndefined

IMAGE_MARKER = "<image>"


class FormatPrompt:
    """A Jinja template wrapped around each question (variable `content`); no file = the question unchanged."""

    def __init__(self, path: Optional[str | Path] = None):
        self.path = str(path) if path else ""
        self._template = None
        if self.path:
            environment = Environment(undefined=StrictUndefined, keep_trailing_newline=False)
            self._template = environment.from_string(Path(self.path).read_text())

    def __call__(self, content: str) -> str:
        return self._template.render(content=content) if self._template else content


def build_messages(text: str) -> list[dict]:
    """One user message: the text split on `<image>` into image and text chunks, in order."""
    content: list[dict] = []
    for position, chunk in enumerate(text.split(IMAGE_MARKER)):
        if position:
            content.append({"type": "image"})
        if chunk:
            content.append({"type": "text", "text": chunk})
    return [{"role": "user", "content": content}]


def render_prompt(processor, text: str) -> str:
    """The processor's chat template (default system message, generation prompt on) over `build_messages`."""
    return processor.apply_chat_template(build_messages(text), add_generation_prompt=True, tokenize=False)
