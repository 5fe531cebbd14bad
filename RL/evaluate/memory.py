"""VITA-RMM's reasoning memory: typed entries, the buffer rendered into the retry prompt, the critic's and the memory
writer's prompts, and the writers (the evaluated model, a local model, or an OpenAI-compatible API).

None of these prompts takes the gold answer: the critic judges the reasoning alone (VITA-RMM's benchmark scripts
passed the gold answer to the critic, which made the loop oracle-assisted).
"""
from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from common.secrets import mask_text
from rewards.judges import JudgeCredentialsError, provider_spec
from rewards.judges.providers import make_provider
from rewards.judges.retry import backoff_delay, is_retryable, retry_after_seconds

logger = logging.getLogger(__name__)

MEMORY_TYPES = ("correction", "insight", "fact")
_ENTRY_RE = re.compile(r"^\s*[-*]?\s*\[(CORRECTION|INSIGHT|FACT)\]\s*:?\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_CRITIC_RE = re.compile(r"VERDICT:\s*(correct|incorrect)\b", re.IGNORECASE)

CRITIC_INSTRUCTION = (
    "Check the proposed solution to the question about the image. Look at the image again, verify each step and the "
    "final answer, and name any error (misreading, wrong fact, faulty step, missing step). End with one line: "
    "VERDICT: correct, or VERDICT: incorrect.")
MEMORY_SYSTEM = (
    "You maintain the memory of a visual reasoning model that retries a question after a self-critique. Write a few "
    "short, factual memory entries that will help its next attempt, one per line, each starting with [CORRECTION] "
    "(an error to avoid and its fix), [INSIGHT] (a useful strategy) or [FACT] (something true about the question). "
    "Write nothing else.")


@dataclass
class MemoryEntry:
    entry_type: str  # correction | insight | fact
    content: str
    confidence: float  # 0.9 when the writer used the [TYPE] format, 0.7 for free text (VITA-RMM's parser)
    id: str
    related_to: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MemoryEntry":
        return cls(**data)


class MemoryBuffer:
    def __init__(self, entries: list[MemoryEntry] | None = None):
        self.entries = list(entries or [])

    def add(self, entries: list[MemoryEntry]) -> None:
        self.entries += entries

    def get(self, entry_id: str) -> MemoryEntry | None:
        return next((entry for entry in self.entries if entry.id == entry_id), None)

    def by_type(self, entry_type: str) -> list[MemoryEntry]:
        return [entry for entry in self.entries if entry.entry_type == entry_type]

    def clear(self) -> None:
        self.entries = []

    def render(self) -> str:
        """"## Memory Buffer" and one "- [TYPE] content" line per entry; "" when empty."""
        if not self.entries:
            return ""
        return "## Memory Buffer\n" + "\n".join(f"- [{e.entry_type.upper()}] {e.content}" for e in self.entries)


def parse_entries(text: str, origin: str) -> list[MemoryEntry]:
    """Entries from a writer's reply: `[TYPE] content` lines, else the whole reply as one free-text insight."""
    found = _ENTRY_RE.findall(text or "")
    if found:
        return [MemoryEntry(kind.lower(), content, 0.9, f"{origin}-{k}", metadata={"origin": origin})
                for k, (kind, content) in enumerate(found)]
    text = (text or "").strip()
    return [MemoryEntry("insight", text, 0.7, f"{origin}-0", metadata={"origin": origin, "free_text": True})] \
        if text else []


def with_memory(question: str, memory: MemoryBuffer) -> str:
    """The retry's question: the memory first, then the question (its `<image>` markers kept)."""
    rendered = memory.render()
    if not rendered:
        return question
    return f"{rendered}\nUse the memory above to avoid your earlier mistakes.\n\n{question}"


def critic_text(question: str, response: str, answer: str) -> str:
    """What the critic model reads: the question (with its image), the attempt and its extracted answer."""
    return f"{question}\n\n[Proposed solution]\n{response}\n\n[Final answer]\n{answer or '(none given)'}\n\n" \
           f"{CRITIC_INSTRUCTION}"


def parse_critic(text: str) -> bool | None:
    """The critic's last `VERDICT:` line: True (correct), False (incorrect) or None (none given)."""
    found = _CRITIC_RE.findall(text or "")
    return None if not found else found[-1].lower() == "correct"


def memory_request(question: str, response: str, critique: str, memory: MemoryBuffer) -> str:
    """The writer's user message: the question (text only), the attempt, its critique and the current buffer."""
    return (f"[Question]\n{question}\n\n[Reasoning]\n{response}\n\n[Feedback]\n{critique}\n\n[Current memory]\n"
            f"{memory.render() or '(empty)'}")


class ApiMemoryWriter:
    """Memory from an OpenAI-compatible (or Gemini) chat model through the judge's provider clients; the judge's
    timeout, retries, backoff, concurrency and request settings apply. A failed request adds no memory."""

    def __init__(self, model: str, base_url: str, judge_config):
        self.config = judge_config
        self.provider = make_provider(model, base_url, judge_config.timeout_s, judge_config.api_kwargs)

    def write(self, requests: list[str]) -> list[str]:
        with ThreadPoolExecutor(max(1, min(int(self.config.max_concurrency), len(requests) or 1))) as pool:
            return list(pool.map(self._complete, requests))

    def _complete(self, user: str) -> str:
        for attempt in range(int(self.config.max_retries) + 1):
            try:
                return self.provider.complete(MEMORY_SYSTEM, user) or ""
            except Exception as error:  # noqa: BLE001 - a failed write means no memory this round, not a crash
                logger.warning("memory writer attempt %d failed: %s", attempt + 1, mask_text(f"{type(error).__name__}"))
                if not is_retryable(error) or attempt == self.config.max_retries:
                    return ""
                time.sleep(backoff_delay(attempt, self.config.retry_backoff_s, retry_after_seconds(error)))
        return ""


def check_memory_credentials(eval_config) -> None:
    """Refuse `eval.rmm_memory_model=api:NAME` when NAME's key variable is unset, before anything loads."""
    spec = eval_config.rmm_memory_model
    if eval_config.method != "rmm" or not spec.startswith("api:"):
        return
    variable = provider_spec(spec[4:], eval_config.rmm_api_base_url).key_var
    if not os.environ.get(variable):
        raise JudgeCredentialsError(f"eval.rmm_memory_model={spec} needs the environment variable {variable}, which "
                                    "is not set")
