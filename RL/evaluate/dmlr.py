"""DMLR: test-time optimisation of n latent thought vectors per item, then one greedy decode with the best of them.

The thoughts are a latent block at the start of the answer (`<abs_vis_token>`, n `<abs_vis_token_pad>`,
`</abs_vis_token>`: the layout the model reasons in), initialised from the model's own block (or, as released, from
`<|endoftext|>`'s embedding). The reward is DMLR's confidence: the mean top-k negative log-probability at the thought
positions and the one after them. What differs from the released code, on purpose:

- antithetic Gaussian pairs with a mean baseline (the release took one sample, no baseline: every step moved along
  its noise because rewards are positive); sigma relative to the RMS of the thought embeddings being optimised by
  default (the release used an absolute sigma on raw coordinates, which means something else for every model and
  init; `eval.dmlr_sigma_scale=absolute` does that);
- every forward is the latent-aware one from `input_ids` with real image features and mRoPE positions (the release
  passed `inputs_embeds` alone: no image features, 1-D positions), continuing from the prompt's KV cache, which is
  computed once per item;
- dynamic visual injection inserts the vision features of selected patches (as `<|image_pad|>` inputs) after each
  thought, reward-gated: a trial set (the first one included) is kept only if it scores better. Patches are selected
  by the cosine similarity between a thought's final hidden state and each image position's, not by attention
  maps: those need eager attention and a forward that returns them, an extra full-precision pass per injection at
  scale; the similarity uses hidden states every forward already returns. The injected patches stay in the final
  decode (`eval.dmlr_inject_in_decode`);
- the result is the best candidate ever EVALUATED (the release stored the updated mean, which was never scored).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from RL.config.schema import EvalConfig
from workers.rollout.base import PromptInput, SamplingParams

Patches = tuple[tuple[int, ...], ...]  # per thought: indices into the item's image positions


@dataclass(frozen=True)
class DmlrSettings:
    """`eval.dmlr_*` without the prefix. No defaults here: they are written once, in RL/config/schema.py:EvalConfig,
    which also says what each key means."""

    tokens: int
    steps: int
    lr: float
    sigma: float
    sigma_scale: str
    sigma_decay: float
    pairs: int
    top_k: int
    init: str
    inject: bool
    initial_patches: int
    patch_increment: int
    max_patches: int
    inject_start: int
    inject_interval: int
    inject_in_decode: bool
    reward_threshold: float

    @classmethod
    def from_eval(cls, ev: EvalConfig | None = None, **changes) -> "DmlrSettings":
        """The `eval.dmlr_*` values of `ev` (the schema's defaults when None), with `changes` (unprefixed) over them."""
        ev = ev or EvalConfig()
        return cls(**{**{item.name: getattr(ev, f"dmlr_{item.name}") for item in dataclasses.fields(cls)}, **changes})


@dataclass
class Candidate:
    latents: torch.Tensor  # (n, D) fp32
    patches: Patches
    reward: float
    step: int  # 0 = before the first update


@dataclass
class SearchResult:
    best: Candidate
    initial_reward: float
    stop: str  # "steps" | "threshold"
    evaluations: int
    trace: list[dict]  # per scoring call: step, best and mean reward of the candidates scored


class Scorer(Protocol):
    def score(self, latents: torch.Tensor, patches: Patches) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) rewards of (B, n, D) candidates with `patches` injected, and (B, n, D) hidden states at the thoughts."""

    def select(self, hidden: torch.Tensor, patches: Patches, count: int, limit: int) -> Patches:
        """`patches` plus up to `count` new ones per thought (at most `limit` in all), chosen from `hidden` (n, D)."""


class LatentSearch:
    """Antithetic evolution strategies on the thoughts, with reward-gated patch injection; keeps the best candidate
    it evaluated."""

    def __init__(self, settings: DmlrSettings, scorer: Scorer, generator: torch.Generator):
        self.settings, self.scorer, self.generator = settings, scorer, generator
        self.best: Candidate | None = None
        self.evaluations, self.trace = 0, []

    def run(self, init: torch.Tensor, scale: float) -> SearchResult:
        """Search from thoughts `init` (n, D); sigma is `settings.sigma * scale`."""
        s, mean = self.settings, init.float().cpu()
        patches: Patches = tuple(() for _ in range(len(mean)))
        rewards, hidden = self.evaluate(mean[None], patches, 0)
        initial = float(rewards[0])
        if s.inject and s.initial_patches:
            patches = self.try_patches(mean, patches, hidden[0], initial, s.initial_patches, 0)
        sigma, stop, mean_scored = s.sigma * scale, "steps", True
        for step in range(1, s.steps + 1):
            mean = self.es_step(mean, patches, sigma, step)
            sigma *= s.sigma_decay
            mean_scored = s.inject and step >= s.inject_start and (step - s.inject_start) % s.inject_interval == 0
            if mean_scored:
                patches = self.inject_step(mean, patches, step)
            if 0 < s.reward_threshold <= self.best.reward:
                stop = "threshold"
                break
        if not mean_scored:  # the final mean is a candidate too
            self.evaluate(mean[None], patches, step)
        return SearchResult(self.best, initial, stop, self.evaluations, self.trace)

    def es_step(self, mean: torch.Tensor, patches: Patches, sigma: float, step: int) -> torch.Tensor:
        """T + lr * mean_i (R_i - mean R) eps_i / sigma over antithetic pairs (+eps, -eps): the paper's
        T + lr * R(T + xi) xi / sigma^2 with xi = sigma * eps, averaged, with a baseline."""
        noise = torch.randn((self.settings.pairs, *mean.shape), generator=self.generator)
        eps = torch.cat([noise, -noise])
        rewards, _ = self.evaluate(mean + sigma * eps, patches, step)
        advantages = (rewards - rewards.mean()).view(-1, 1, 1)
        return mean + self.settings.lr * (advantages * eps).mean(0) / sigma

    def inject_step(self, mean: torch.Tensor, patches: Patches, step: int) -> Patches:
        """Score the mean, then try more patches chosen from its thoughts' hidden states."""
        rewards, hidden = self.evaluate(mean[None], patches, step)
        return self.try_patches(mean, patches, hidden[0], float(rewards[0]), self.settings.patch_increment, step)

    def try_patches(self, mean, patches: Patches, hidden, reward: float, count: int, step: int) -> Patches:
        """`patches` plus `count` more per thought if that scores better than `reward`, else `patches`."""
        trial = self.scorer.select(hidden, patches, count, self.settings.max_patches)
        if trial == patches:
            return patches
        trial_rewards, _ = self.evaluate(mean[None], trial, step)
        return trial if float(trial_rewards[0]) > reward else patches

    def evaluate(self, latents: torch.Tensor, patches: Patches, step: int):
        rewards, hidden = self.scorer.score(latents, patches)
        rewards = rewards.float().cpu()
        self.evaluations += len(rewards)
        top = int(rewards.argmax())
        if self.best is None or float(rewards[top]) > self.best.reward:
            self.best = Candidate(latents[top].clone(), patches, float(rewards[top]), step)
        self.trace.append({"step": step, "max": float(rewards.max()), "mean": float(rewards.mean())})
        return rewards, hidden


class ModelScorer:
    """DMLR's reward on the model: the prompt and `<abs_vis_token>` are prefilled once (real image features, mRoPE);
    each scoring call continues a copy of that cache with the thought block of every candidate. No gradients: the
    search is zeroth-order."""

    @torch.no_grad()
    def __init__(self, model, tokens, prompt: PromptInput, top_k: int):
        self.model, self.tokens, self.top_k = model, tokens, top_k
        self.device = next(model.parameters()).device
        ids = torch.cat([prompt.input_ids.cpu(), torch.tensor([tokens.start])]).to(self.device)[None]
        pixels = grid = None
        if prompt.has_images:
            pixels = prompt.pixel_values.to(self.device, model.model.visual.dtype)
            grid = prompt.image_grid_thw.to(self.device)
        from transformers import DynamicCache

        self.prefix = DynamicCache(config=model.config)
        out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, past_key_values=self.prefix,
                    use_cache=True, latent_mode=True)
        self.length, self.forwards = ids.shape[1], 1
        self.next_position = self.length + int(out.rope_deltas.view(-1)[0])  # text after the image: index + delta
        image = ids[0] == model.config.image_token_id
        self.features = out.image_embeds if out.image_embeds is not None else out.hidden_states.new_zeros(0, 1)
        self.image_hidden = out.hidden_states[0, image].float()
        self.start_hidden = out.hidden_states[0, -1].float()

    @torch.no_grad()
    def own_latents(self, n: int) -> torch.Tensor:
        """The block the model itself would reason in: z_1 = h(<abs_vis_token>), z_k = h(z_{k-1})."""
        latents, cache = [self.start_hidden], self._prefix_copy(1)
        for k in range(1, n):
            out = self.model(input_ids=torch.tensor([[self.tokens.pad]], device=self.device),
                             position_ids=self._positions(1, 1, offset=k - 1), latent_embeds=latents[-1][None],
                             past_key_values=cache, use_cache=True, latent_mode=True)
            self.forwards += 1
            latents.append(out.hidden_states[0, -1].float())
        return torch.stack(latents).cpu()

    def embedding_latents(self, n: int) -> torch.Tensor:
        """The released initialisation: n copies of `<|endoftext|>`'s input embedding."""
        return self.model.get_input_embeddings().weight[self.tokens.pad_token].float().repeat(n, 1).cpu()

    @torch.no_grad()
    def score(self, latents: torch.Tensor, patches: Patches) -> tuple[torch.Tensor, torch.Tensor]:
        out, thoughts = self._forward(latents, patches, self._prefix_copy(len(latents)))
        log_probs = out.logits[:, thoughts].float().log_softmax(-1)
        reward = -log_probs.topk(min(self.top_k, log_probs.shape[-1]), dim=-1).values.mean(-1).mean(-1)
        return reward.cpu(), out.hidden_states[:, thoughts[:-1]].float()

    def select(self, hidden: torch.Tensor, patches: Patches, count: int, limit: int) -> Patches:
        if not len(self.image_hidden) or count < 1:
            return patches
        similarity = F.normalize(hidden.float(), dim=-1) @ F.normalize(self.image_hidden, dim=-1).T
        chosen = []
        for thought, have in enumerate(patches):
            room = max(0, min(count, limit - len(have)))
            new = [p for p in similarity[thought].argsort(descending=True).tolist() if p not in have][:room]
            chosen.append(tuple(have) + tuple(new))
        return tuple(chosen)

    @torch.no_grad()
    def continuation(self, latents: torch.Tensor, patches: Patches):
        """The prompt plus this thought block, run through the model: where the final decode starts."""
        from workers.rollout.native import Continuation

        cache = self._prefix_copy(1)
        out, thoughts = self._forward(latents[None], patches, cache)
        width = thoughts[-1] + 1
        return Continuation(cache, out.hidden_states[0, -1], out.logits[0, -1], self.length + width,
                            self.next_position + width)

    def _forward(self, latents: torch.Tensor, patches: Patches, cache):
        """One forward of B candidates' blocks [pad, patches..., pad, patches..., </abs_vis_token>] after the prefix;
        returns (output, positions of the thoughts and of the end token)."""
        ids, thoughts = [], []
        for chosen in patches:
            thoughts.append(len(ids))
            ids += [self.tokens.pad] + [self.tokens.image_pad] * len(chosen)
        thoughts.append(len(ids))
        ids.append(self.tokens.end)
        rows, width = len(latents), len(ids)
        flat = [p for chosen in patches for p in chosen]
        image = self.features[flat].repeat(rows, 1) if flat else None
        dtype = self.model.get_input_embeddings().weight.dtype
        out = self.model(input_ids=torch.tensor([ids], device=self.device).expand(rows, width),
                         position_ids=self._positions(rows, width), image_embeds=image,
                         latent_embeds=latents.reshape(-1, latents.shape[-1]).to(self.device, dtype),
                         past_key_values=cache, use_cache=True, latent_mode=True)
        self.forwards += rows
        return out, thoughts

    def _positions(self, rows: int, width: int, offset: int = 0) -> torch.Tensor:
        """(3, rows, width) mRoPE positions of tokens after the prefix: text positions on all three axes."""
        positions = self.next_position + offset + torch.arange(width, device=self.device)
        return positions.view(1, 1, width).expand(3, rows, width)

    def _prefix_copy(self, rows: int):
        cache = copy.deepcopy(self.prefix)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache


def noise_scale(init: torch.Tensor, settings: DmlrSettings) -> float:
    """What `settings.sigma` is measured in: the initial thoughts' RMS (`rms`, the paper's "10%"), or raw embedding
    coordinates (`absolute`, the release's σ = 20)."""
    return float(init.float().pow(2).mean().sqrt()) if settings.sigma_scale == "rms" else 1.0


@torch.no_grad()
def run_dmlr(engine, prompt: PromptInput, settings: DmlrSettings, params: SamplingParams, seed: int) -> dict:
    """Optimise one item's thoughts on the native engine's model, then decode greedily after the best candidate."""
    start = time.perf_counter()
    scorer = ModelScorer(engine.model.eval(), engine.tokens, prompt, settings.top_k)
    n = settings.tokens
    init = scorer.own_latents(n) if settings.init == "model" else scorer.embedding_latents(n)
    result = LatentSearch(settings, scorer, torch.Generator().manual_seed(seed)).run(init, noise_scale(init, settings))
    best = result.best
    patches = best.patches if settings.inject_in_decode else tuple(() for _ in best.patches)
    sample = engine.continue_from(scorer.continuation(best.latents, patches), params)[0]
    return {"sample": sample, "latents": best.latents, "patches": [list(p) for p in patches],
            "best_reward": best.reward, "best_step": best.step, "initial_reward": result.initial_reward,
            "search_stop": result.stop, "evaluations": result.evaluations,
            "forwards": scorer.forwards + max(len(sample.response_ids) - 1, 0), "trace": result.trace,
            "seconds": time.perf_counter() - start}
