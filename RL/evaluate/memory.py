"""VITA-RMM's reasoning memory: typed entries, the buffer rendered into the retry prompt, the critic's and the memory
manager's prompts, and the chat API client both can use.

None of these prompts takes the gold answer: the critic judges the reasoning alone (VITA-RMM's benchmark scripts
passed the gold answer to the critic, which made the loop oracle-assisted). The memory manager's prompt
(`manager_prompt`) is one text for the simulation's training rows, the SFT of the manager and its use in evaluation:
VITA-RMM trained on one prompt and ran inference on another.
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
FEEDBACK_SYSTEM = "You are an expert evaluator helping improve reasoning."  # VITA-RMM's, for a chat API critic
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
        """Append the entries not already held (same type and content): a fact learned twice is one memory."""
        for entry in entries:
            if not any((e.entry_type, e.content) == (entry.entry_type, entry.content) for e in self.entries):
                self.entries.append(entry)

    def get(self, entry_id: str) -> MemoryEntry | None:
        return next((entry for entry in self.entries if entry.id == entry_id), None)

    def by_type(self, entry_type: str) -> list[MemoryEntry]:
        return [entry for entry in self.entries if entry.entry_type == entry_type]

    def clear(self) -> None:
        self.entries = []

    def render(self, limit: int = 0) -> str:
        """"## Memory Buffer" and one "- [TYPE] content" line per entry (the newest `limit`, 0 = all); "" when
        empty."""
        shown = self.entries[-limit:] if limit > 0 else self.entries
        if not shown:
            return ""
        return "## Memory Buffer\n" + "\n".join(f"- [{e.entry_type.upper()}] {e.content}" for e in shown)

    def copy(self) -> "MemoryBuffer":
        return MemoryBuffer(self.entries)


def parse_entries(text: str, origin: str) -> list[MemoryEntry]:
    """Entries from a writer's reply: `[TYPE] content` lines, else the whole reply as one free-text insight."""
    found = _ENTRY_RE.findall(text or "")
    if found:
        return [MemoryEntry(kind.lower(), content, 0.9, f"{origin}-{k}", metadata={"origin": origin})
                for k, (kind, content) in enumerate(found)]
    text = (text or "").strip()
    return [MemoryEntry("insight", text, 0.7, f"{origin}-0", metadata={"origin": origin, "free_text": True})] \
        if text else []


def typed_text(entries: list[MemoryEntry]) -> str:
    """Entries as the manager is trained to write them: one `[TYPE] content` line each."""
    return "\n".join(f"[{entry.entry_type.upper()}] {entry.content}" for entry in entries)


def with_memory(question: str, memory: MemoryBuffer, limit: int = 0) -> str:
    """An attempt's question: the memory first (its newest `limit` entries), then the question (its `<image>` markers
    kept)."""
    rendered = memory.render(limit)
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


def memory_request(question: str, response: str, critique: str, memory: MemoryBuffer, limit: int = 0) -> str:
    """The manager's user message: the question (text only), the attempt, its critique and the current buffer (its
    newest `limit` entries)."""
    return (f"[Question]\n{question}\n\n[Reasoning]\n{response}\n\n[Feedback]\n{critique}\n\n[Current memory]\n"
            f"{memory.render(limit) or '(empty)'}")


def manager_prompt(request: str) -> str:
    """The whole text a local memory manager reads (chat-templated as the user turn), in simulation rows, SFT and
    evaluation alike; a chat API gets MEMORY_SYSTEM as its system message and `request` as the user message."""
    return f"{MEMORY_SYSTEM}\n\n{request}"


class ApiChat:
    """Replies of an OpenAI-compatible (or Gemini) chat model through the judge's provider clients; the judge's
    timeout, retries, backoff, concurrency and request settings apply. A failed request replies "" (no feedback or
    no memory this round, never a crash)."""

    def __init__(self, model: str, base_url: str, judge_config, system: str):
        self.config, self.system = judge_config, system
        self.provider = make_provider(model, base_url, judge_config.timeout_s, judge_config.api_kwargs)

    def __call__(self, users: list[str]) -> list[str]:
        with ThreadPoolExecutor(max(1, min(int(self.config.max_concurrency), len(users) or 1))) as pool:
            return list(pool.map(self._complete, users))

    def _complete(self, user: str) -> str:
        for attempt in range(int(self.config.max_retries) + 1):
            try:
                return self.provider.complete(self.system, user) or ""
            except Exception as error:  # noqa: BLE001 - a failed request means no text this round, not a crash
                logger.warning("RMM chat API attempt %d failed: %s", attempt + 1, mask_text(f"{type(error).__name__}"))
                if not is_retryable(error) or attempt == self.config.max_retries:
                    return ""
                time.sleep(backoff_delay(attempt, self.config.retry_backoff_s, retry_after_seconds(error)))
        return ""


def check_memory_credentials(eval_config) -> None:
    """Refuse `eval.rmm_memory_model` or `eval.rmm_feedback_model` = api:NAME when NAME's key variable is unset,
    before anything loads."""
    if eval_config.method != "rmm":
        return
    for key in ("rmm_feedback_model", "rmm_memory_model"):
        spec = getattr(eval_config, key)
        if not spec.startswith("api:"):
            continue
        variable = provider_spec(spec[4:], eval_config.rmm_api_base_url).key_var
        if not os.environ.get(variable):
            raise JudgeCredentialsError(f"eval.{key}={spec} needs the environment variable {variable}, which is not "
                                        "set")
