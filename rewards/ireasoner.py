"""iReasoner solver reward as a batch reward function: r_i = (1 − w_t)·r_soft,i + w_t·r_step,i per prompt group.

Batch mode matters here: both terms compare a sample with the other samples of its group (``group_id``). With
``variant="evolmm"`` (or w_t = 0) the step term is skipped and r_i = r_soft,i, EvoLMM's length settings apply.
"""
from __future__ import annotations

from typing import Callable

from .accuracy import answers_match
from .answer import VOTE_EDGES, normalize_text, strip_latents
from .interface import RewardInput
from .judgement import Judgement, judge_rule_negatives
from .ireasoner_parse import parse_answer, parse_think, word_count
from .self_consistency import EVOLMM_LEN, IREASONER_LEN, answer_stats, soft_rewards
from .step_agreement import split_steps, step_agreement_rewards, step_weight

STEP_STATS = ("dominant_size", "positions_used", "mean_cos", "density")


def solver_answer(response: str) -> str:
    """The normalised answer a solver response gives, the one its samples vote with (latents carry no answer text)."""
    return normalize_text(parse_answer(strip_latents(response)), VOTE_EDGES)


def _groups(samples: list[RewardInput]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.group_id or f"__single_{i}", []).append(i)
    return groups


def _resolve_embed_fn(embed_fn, embedder: str) -> Callable | None:
    if embed_fn is not None:
        return embed_fn
    if embedder:
        from .embedders import make_embed_fn

        return make_embed_fn(embedder)
    return None


def ireasoner_solver_reward(samples: list[RewardInput], step: int = 0, total_steps: int = 2500, start_step: int = 0,
                            variant: str = "ireasoner", embed_fn: Callable | None = None, embedder: str = "",
                            gamma: float = 0.7, len_penalty: float | None = None, target_words: float | None = None,
                            w_start: float = 0.0, w_end: float = 0.7, warmup_frac: float = 0.3,
                            step_temperature: float = 1.0, step_position_decay: float = 0.15,
                            step_density_gamma: float = 0.7, **_: object) -> list[dict[str, float]]:
    """Solver rewards with components ``soft``, ``step``, ``step_weight``, ``consistency`` (1[a_i = a*]) and the
    group's step-agreement diagnostics (``step_dominant_size``, ``step_positions_used``, ``step_mean_cos``,
    ``step_density``)."""
    length = EVOLMM_LEN if variant == "evolmm" else IREASONER_LEN
    lam = length["len_penalty"] if len_penalty is None else len_penalty
    tau = length["target_words"] if target_words is None else target_words
    w_t = 0.0 if variant == "evolmm" else step_weight(step, total_steps, start_step, w_start, w_end, warmup_frac)
    out: list[dict[str, float]] = [{} for _ in samples]
    for indices in _groups(samples).values():
        texts = [strip_latents(samples[i].response) for i in indices]
        answers = [solver_answer(t) for t in texts]
        soft = soft_rewards(answers, [word_count(t) for t in texts], gamma, lam, tau)
        step_r, info = [0.0] * len(indices), dict.fromkeys(STEP_STATS, 0.0)
        if w_t > 0:
            fn = _resolve_embed_fn(embed_fn, embedder)
            if fn is None:
                raise ValueError("ireasoner_solver_reward: the step term (w_t > 0) needs embed_fn or "
                                 "embedder='token:<model_path>' | 'minilm' in worker.reward.reward_function_kwargs")
            step_r, info = step_agreement_rewards(answers, [split_steps(parse_think(t)) for t in texts], fn,
                                                  density_gamma=step_density_gamma, decay=step_position_decay,
                                                  temperature=step_temperature)
        majority = answer_stats(answers).majority
        for k, i in enumerate(indices):
            out[i] = {"overall": (1 - w_t) * soft[k] + w_t * step_r[k], "soft": soft[k], "step": step_r[k],
                      "step_weight": w_t, "consistency": float(answers[k] == majority),
                      **{f"step_{key}": float(info[key]) for key in STEP_STATS}}
    return out


def judge_answers(questions: list[str], predictions: list[str], truths: list[str], judge=None) -> list[int]:
    """Verdicts (1/0) of already extracted answers: rules first, rule negatives to the API judge when one is set
    (`rewards.judgement`: a judge failure keeps the rule verdict; a −1 from repetition mode counts as 0 here)."""
    judged = [Judgement(int(answers_match(p, t))) for p, t in zip(predictions, truths)]
    judged = judge_rule_negatives(judged, list(zip(questions, predictions, truths)), judge)
    return [int(j.verdict > 0) for j in judged]
