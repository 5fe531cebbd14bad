"""Parsing of proposer and solver outputs for the self-evolution loop (iReasoner section 3, as released).

Answers are compared by exact equality after ``rewards.ireasoner.solver_answer`` (this parser, then the one answer
normaliser ``rewards.answer.normalize_text`` with iReasoner's edges), which decides which samples agree.
"""
from __future__ import annotations

import re

FALLBACK_QUESTION = "What is the most prominent value shown in the image?"


def _between(text: str, open_tag: str, close_tag: str) -> str | None:
    start = text.find(open_tag)
    if start < 0:
        return None
    end = text.find(close_tag, start + len(open_tag))
    return None if end < 0 else text[start + len(open_tag) : end]


def parse_question(output: str) -> str:
    """First ``<question>…</question>``, else the whole output; newlines to spaces; fixed fallback when empty."""
    inner = _between(output, "<question>", "</question>")
    question = (inner if inner is not None else output).replace("\n", " ").strip()
    return question or FALLBACK_QUESTION


def parse_answer(output: str) -> str:
    """First ``<answer>…</answer>``, else the last non-empty line, else ``"unknown"`` (``\\boxed`` is not parsed)."""
    inner = _between(output, "<answer>", "</answer>")
    if inner is not None:
        return inner.strip()
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown"


def parse_think(output: str) -> str:
    """``<think>…</think>``, else the text before ``<answer>``, else the whole output."""
    inner = _between(output, "<think>", "</think>")
    if inner is not None:
        return inner.strip()
    cut = output.find("<answer>")
    return (output[:cut] if cut >= 0 else output).strip()


def word_count(output: str) -> int:
    """Whitespace tokens before the first ``<answer>`` (case-insensitive), else of the whole output."""
    match = re.search(r"<answer>", output, re.IGNORECASE)
    return len((output[: match.start()] if match else output).split())
