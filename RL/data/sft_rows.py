"""Reading latent-SFT rows of three formats into one form: a prompt with images, and response steps.

- Monet SFT (`data`: chat turns whose content items are `{"type": "image", "image": path}` or `{"type": "text"}`):
  in the assistant turn each `<abs_vis_token></abs_vis_token>` is followed by an auxiliary image; `<observation>`
  ... `</observation>` mark text read off that image. System turns are dropped (the chat template's default system
  message is Monet's), and observation tags before the first auxiliary image are removed, as the released code does.
- Mirage (`text_input` with `<image>` markers, `image_input`, `image_output` = the helper image, `text_output` where
  each `<output_image>` is a latent block; without one the block opens the response).
- The RL rows (`data.prompt_key`, `data.answer_key`, `data.image_key`), optionally with a `response` in which each
  `<latent>` is a latent block; without a response the target is a block then "The answer is \\boxed{answer}."
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from RL.data.errors import DataError, RowSkipped
from RL.data.images import as_image_list
from RL.data.format_prompt import IMAGE_MARKER

MONET_PLACEHOLDER = "<abs_vis_token></abs_vis_token>"
MIRAGE_BLOCK = "<output_image>"
LATENT_MARK = "<latent>"
OBSERVATION_OPEN, OBSERVATION_CLOSE = "<observation>", "</observation>"
ANSWER_TEMPLATE = "The answer is \\boxed{{{answer}}}."
FORMATS = ("monet", "mirage", "rl")


@dataclass
class Step:
    """One piece of a response: text (may hold observation tags), an auxiliary image, or a latent block."""

    kind: str  # text | aux | latent
    value: Any = None


@dataclass
class SFTRow:
    row_id: str
    prompt: str  # the user text with one <image> marker per prompt image
    images: list  # raw prompt image values
    steps: list[Step] = field(default_factory=list)
    helper: Any = None  # Mirage's helper image (raw value)

    @property
    def aux_images(self) -> list:
        return [step.value for step in self.steps if step.kind == "aux"]


def detect_format(columns: list[str], prompt_key: str, where: str) -> str:
    """monet | mirage | rl, from the columns of the source `where` names; anything else is refused by name."""
    if "data" in columns:
        return "monet"
    if {"text_input", "text_output"} <= set(columns):
        return "mirage"
    if prompt_key in columns:
        return "rl"
    raise DataError(f"{where}: columns {sorted(columns)} match no SFT format: Monet rows have `data`, Mirage rows "
                    f"`text_input`/`text_output`, RL rows `{prompt_key}` (data.prompt_key)")


def parse_row(row: dict, fmt: str, keys, row_id: str) -> SFTRow:
    """The row in the common form; `keys` holds prompt_key, answer_key and image_key (the data config)."""
    if fmt == "monet":
        return _monet(row, row_id)
    if fmt == "mirage":
        return _mirage(row, row_id)
    return _rl(row, keys, row_id)


def _monet(row: dict, row_id: str) -> SFTRow:
    turns = row.get("data")
    if not isinstance(turns, list):
        raise RowSkipped("missing_key", "data")
    user = next((t for t in turns if isinstance(t, dict) and t.get("role") == "user"), None)
    assistant = next((t for t in turns if isinstance(t, dict) and t.get("role") == "assistant"), None)
    if user is None or assistant is None:
        raise RowSkipped("missing_key", "a user and an assistant turn")
    prompt, images = "", []
    for item in user.get("content") or []:
        if item.get("type") == "image":
            prompt, images = prompt + IMAGE_MARKER, images + [item.get("image")]
        elif item.get("type") == "text":
            prompt += item.get("text") or ""
    texts = [i.get("text") or "" for i in assistant.get("content") or [] if i.get("type") == "text"]
    aux = [i.get("image") for i in assistant.get("content") or [] if i.get("type") == "image"]
    pieces = "".join(texts).split(MONET_PLACEHOLDER)
    if len(pieces) - 1 != len(aux):
        raise RowSkipped("aux_image_mismatch", f"{len(pieces) - 1} {MONET_PLACEHOLDER} for {len(aux)} images")
    steps = [Step("text", _drop_tags(pieces[0]))]
    for image, text in zip(aux, pieces[1:]):
        steps += [Step("aux", image), Step("text", text)]
    return _checked(SFTRow(_row_id(row, row_id), prompt, images, [s for s in steps if s.value != ""]))


def _drop_tags(text: str) -> str:
    """Observation tags before any auxiliary image mark nothing (the released preprocessing drops them)."""
    return text.replace(OBSERVATION_OPEN, "").replace(OBSERVATION_CLOSE, "")


def _mirage(row: dict, row_id: str) -> SFTRow:
    prompt, output = row.get("text_input"), row.get("text_output")
    if not isinstance(prompt, str) or not isinstance(output, str):
        raise RowSkipped("missing_key", "text_input" if not isinstance(prompt, str) else "text_output")
    images = as_image_list(row.get("image_input"))
    if IMAGE_MARKER not in prompt:
        prompt = IMAGE_MARKER * len(images) + prompt
    if MIRAGE_BLOCK not in output:
        output = MIRAGE_BLOCK + output
    return _checked(SFTRow(row_id, prompt, images, _split_blocks(output, MIRAGE_BLOCK), row.get("image_output")))


def _rl(row: dict, keys, row_id: str) -> SFTRow:
    question, answer = row.get(keys.prompt_key), row.get(keys.answer_key)
    response = row.get("response")
    if not isinstance(question, str) or (answer is None and response is None):
        raise RowSkipped("missing_key", keys.prompt_key if not isinstance(question, str) else keys.answer_key)
    images = as_image_list(row.get(keys.image_key))
    if IMAGE_MARKER not in question:
        question = IMAGE_MARKER * len(images) + question
    if response is None:
        response = LATENT_MARK + ANSWER_TEMPLATE.format(answer=answer)
    return _checked(SFTRow(_row_id(row, row_id), question, images, _split_blocks(response, LATENT_MARK)))


def _split_blocks(text: str, mark: str) -> list[Step]:
    steps: list[Step] = []
    for index, piece in enumerate(text.split(mark)):
        steps += ([Step("latent")] if index else []) + ([Step("text", piece)] if piece else [])
    return steps


def _checked(row: SFTRow) -> SFTRow:
    if not row.prompt.replace(IMAGE_MARKER, "").strip():
        raise RowSkipped("empty_prompt", "no question text")
    if row.prompt.count(IMAGE_MARKER) != len(row.images):
        raise RowSkipped("image_count_mismatch", f"{row.prompt.count(IMAGE_MARKER)} markers, {len(row.images)} images")
    return row


def _row_id(row: dict, fallback: str) -> str:
    """Monet's `metadata` (dataset_name, sample_id), else an `id` column, else source#row."""
    meta: Optional[dict] = row.get("metadata") if isinstance(row.get("metadata"), dict) else None
    if meta and meta.get("sample_id") is not None:
        return f"{meta.get('dataset_name', 'data')}-{meta['sample_id']}"
    return str(row["id"]) if row.get("id") not in (None, "") else fallback
