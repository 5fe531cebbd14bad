"""Trajectory-aware step agreement (iReasoner section 5): reward the majority's samples whose reasoning steps agree.

Only samples that reached the majority answer are compared; step j of each is scored by its cosine to the (normalised)
mean of the group's step-j embeddings, early steps weighing more. A majority of fewer than 2 gives no signal. The
step reward is phased in by ``step_weight`` so early training leans on the answer-level consistency reward.
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch

from .self_consistency import answer_stats

MAX_STEPS = 8
_STEP_TAG_RE = re.compile(r"<step>(.*?)</step>", re.DOTALL | re.IGNORECASE)
_STEP_LINE_RE = re.compile(r"^\s*(?:step\s*\d+|\d+[.)](?!\d))\s*[:\-]?\s*(.*)$", re.IGNORECASE)
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+")


def _split_lines(text: str) -> list[str]:
    steps: list[str] = []
    for line in (raw.strip() for raw in text.splitlines()):
        if not line:
            continue
        match = _STEP_LINE_RE.match(line)
        if match:
            steps.append(match.group(1).strip())
        elif steps:
            steps[-1] = f"{steps[-1]} {line}".strip()
        else:
            steps.append(line)
    return steps


def split_steps(think: str, max_steps: int = MAX_STEPS) -> list[str]:
    """``<step>`` tags, else numbered lines ("Step N", "N.", "N)"), else sentences; at most ``max_steps``."""
    tagged = [s.strip() for s in _STEP_TAG_RE.findall(think) if s.strip()]
    steps = tagged or _split_lines(think) or [s.strip() for s in _SENTENCE_RE.split(think) if s.strip()]
    return steps[:max_steps]


def position_weight(j: int, decay: float = 0.15) -> float:
    return math.exp(-decay * j)


def step_weight(t: int, total_steps: int, start_step: int = 0, w_start: float = 0.0, w_end: float = 0.7,
                warmup_frac: float = 0.3) -> float:
    """w_t: ``w_start`` for the first ``warmup_frac`` of the run, then linear to ``w_end``; ``start_step`` is the
    run's origin, not the resume step (iReasoner restarted the warm-up on resume)."""
    progress = min(max((t - start_step) / max(1, total_steps - start_step), 0.0), 1.0)
    u = 0.0 if progress <= warmup_frac else (progress - warmup_frac) / (1 - warmup_frac)  # warmup_frac < 1
    return min(max(w_start + (w_end - w_start) * u, 0.0), 1.0)


def _embed_steps(steps: list[list[str]], members: list[int], embed_fn, max_steps: int) -> dict[tuple[int, int], torch.Tensor]:
    keys = [(i, j) for i in members for j, text in enumerate(steps[i][:max_steps]) if text.strip()]
    if not keys:
        return {}
    vectors = torch.as_tensor(embed_fn([steps[i][j] for i, j in keys])).float()
    return dict(zip(keys, vectors))


def step_agreement_rewards(answers: list[str], steps: list[list[str]], embed_fn: Callable[[list[str]], torch.Tensor],
                           max_steps: int = MAX_STEPS, density_gamma: float = 0.7, decay: float = 0.15,
                           temperature: float = 1.0) -> tuple[list[float], dict[str, float]]:
    """r_step per sample of one group (normalised answers, split steps) and diagnostics to log."""
    n = len(answers)
    majority = answer_stats(answers).majority
    members = [i for i, a in enumerate(answers) if a == majority]
    info = {"dominant_size": float(len(members)), "positions_used": 0.0, "mean_cos": 0.0, "density": 0.0}
    rewards = [0.0] * n
    if len(members) < 2:
        return rewards, info
    density = (len(members) / n) ** density_gamma
    info["density"] = density
    emb = _embed_steps(steps, members, embed_fn, max_steps)
    num, den, cosines = [0.0] * n, [0.0] * n, []
    for j in range(max_steps):
        at_j = [i for i in members if (i, j) in emb]
        if len(at_j) < 2:
            continue
        info["positions_used"] += 1
        stack = torch.stack([emb[(i, j)] for i in at_j])
        proto = torch.nn.functional.normalize(stack.mean(0), dim=0)
        cos = torch.nn.functional.cosine_similarity(stack, proto.unsqueeze(0), dim=1).clamp(-1, 1)
        cosines.extend(cos.tolist())
        scores = torch.tanh(cos / temperature) if temperature != 1.0 else cos
        for i, s in zip(at_j, scores.tolist()):
            num[i] += position_weight(j, decay) * (s + 1) / 2
            den[i] += position_weight(j, decay)
    for i in members:
        rewards[i] = density * num[i] / den[i] if den[i] > 0 else 0.0
    info["mean_cos"] = sum(cosines) / len(cosines) if cosines else 0.0
    return rewards, info
