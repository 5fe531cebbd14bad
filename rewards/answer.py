"""Answers, one home: extraction and normalisation for the rule grader, the format reward, the API judge and the
self-evolution vote (``\\boxed{}`` is found only by ``last_boxed``, text is normalised only by ``normalize_text``).

Responses reach the reward worker with latent blocks rendered as ``<latent×K>``; those placeholders carry no answer text
and must never be graded, so every extractor strips them first.
"""
from __future__ import annotations

import re
import string

_LATENT_RE = re.compile(r"<latent[^>]*>|<abs_vis_token(?:_pad)?>|</abs_vis_token>")
_BOXED_RE = re.compile(r"\\boxed\s*\{")
_LAST_IS_RE = re.compile(r"\bis\b(?!.*\bis\b)", re.IGNORECASE | re.DOTALL)

GRADER_EDGES = " .!?;:'\"()[]{}"  # keeps signs, %, units and operators: "-5" is not "5" for the rule grader
VOTE_EDGES = " " + string.punctuation  # every ASCII mark, as iReasoner's release strips before its majority vote


def strip_latents(text: str) -> str:
    """Remove latent placeholders and stray latent special tokens (they are not answer text)."""
    return _LATENT_RE.sub("", text or "")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (brace-balanced), or None when there is no complete box."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1].strip()
    return None


def extract_answer(response: str) -> str:
    """The graded answer: last ``\\boxed{}`` content, else the text after the last word "is", else ""."""
    text = strip_latents(response)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    match = _LAST_IS_RE.search(text)
    if match is None:
        return ""
    tail = text[match.end() :].strip()
    return tail.rstrip(".").strip()


def judge_prediction(response: str, repetition: bool = False) -> str:
    """What the API judge reads: the extracted answer; the whole response (latents stripped) when there is none, so
    an answer the rules cannot find still gets a verdict, and in repetition mode, where the judge must see loops."""
    answer = "" if repetition else extract_answer(response)
    return answer or strip_latents(response).strip()


def normalize_text(text: str, edges: str = GRADER_EDGES) -> str:
    """Lower-case, drop LaTeX text wrappers, ``$``, commas and extra spaces, then strip the characters `edges` from both
    ends. Why two edge sets: the rule grader compares with a ground truth, so a sign or a unit at an end is part of
    the answer (`GRADER_EDGES`); the self-evolution vote compares samples with each other, and iReasoner's release
    counts answers that differ only in punctuation at an end as the same vote (`VOTE_EDGES`)."""
    text = re.sub(r"\\text(?:bf|rm|it)?\s*\{([^{}]*)\}", r"\1", text or "")
    text = text.replace("$", "").replace(",", "").lower()
    text = re.sub(r"\s+", " ", text).strip()
    return text.strip(edges)
