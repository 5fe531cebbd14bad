"""The generation passes: direct, the latent ablations and DMLR. Each is called with one batch of item indices and
returns their rows (unjudged); `runner.run_pass` times, judges and stores them.

Ablations change only what is fed at `<abs_vis_token_pad>` (`SamplingParams.latent_override`), or forbid blocks:
- `zero`: zero vectors; `noise`: Gaussian vectors with the norm of the hidden state they replace;
- `shuffle`: the latents the direct pass recorded for another item (a seeded derangement), fed in order, cycling;
- `text`: latent blocks disallowed (greedy text).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch

from RL.evaluate import EvaluationError
from RL.evaluate.dmlr import DmlrSettings
from RL.evaluate.item_prompts import item_prompt
from RL.evaluate.evaluation import Evaluation, shards
from common.seeding import derive_seed

OVERRIDES = {"zero": {"latent_override": "zero"}, "noise": {"latent_override": "noise"},
             "shuffle": {}, "text": {"strategy": "greedy"}}  # shuffle: `given` latents, see Evaluation.generate


class DirectPass:
    """Batched generation with the evaluation's strategy; records the latents when a shuffle ablation needs them."""

    def __init__(self, evaluation: Evaluation, name: str):
        self.evaluation = evaluation
        self.record = "shuffle" in evaluation.config.eval.ablate.split(",")

    def __call__(self, batch: int, indices: list[int]) -> list[dict]:
        ev = self.evaluation
        items = [ev.dataset[i] for i in indices]
        seed = derive_seed(ev.config.eval.seed, "direct", "batch", batch)
        if ev.endpoint is not None:
            return ev.endpoint.rows(ev, indices, items, ev.params(), seed)
        samples = ev.generate([item_prompt(item) for item in items], ev.params(), seed)
        if self.record:
            save_latents(latent_dir(ev), indices, samples)
        return [ev.row(index, item, sample) for index, item, sample in zip(indices, items, samples)]


class AblationPass:
    def __init__(self, evaluation: Evaluation, name: str):
        self.evaluation, self.name, self.kind = evaluation, name, name.removeprefix("ablate_")
        self.donors = donor_map(evaluation) if self.kind == "shuffle" else {}

    def __call__(self, batch: int, indices: list[int]) -> list[dict]:
        ev = self.evaluation
        items = [ev.dataset[i] for i in indices]
        given = None
        if self.kind == "shuffle":
            given = [torch.load(latent_dir(ev) / f"{self.donors[i]}.pt", map_location="cpu", weights_only=True)
                     for i in indices]
        seed = derive_seed(ev.config.eval.seed, self.name, "batch", batch)
        if ev.endpoint is not None:  # `text` only (the config checks)
            return ev.endpoint.rows(ev, indices, items, ev.params(**OVERRIDES[self.kind]), seed)
        samples = ev.generate([item_prompt(item) for item in items], ev.params(**OVERRIDES[self.kind]), seed, given)
        extra = lambda index: {"donor": self.donors[index]} if self.donors else {}  # noqa: E731
        return [ev.row(index, item, sample, **extra(index)) for index, item, sample in zip(indices, items, samples)]


def latent_dir(evaluation: Evaluation) -> Path:
    return evaluation.folder / "latents" / "direct"


def save_latents(folder: Path, indices: list[int], samples: list) -> None:
    """`<index>.pt` holds an item's direct latents, `<index>.none` marks an item whose answer had none."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, sample in zip(indices, samples):
        if sample.latents is None:
            (folder / f"{index}.none").touch()
        else:
            torch.save(sample.latents, folder / f"{index}.pt")


def record_direct_latents(evaluation: Evaluation) -> None:
    """Regenerate the direct pass for items whose latents were not recorded (e.g. it ran without a shuffle)."""
    folder, size = latent_dir(evaluation), evaluation.config.eval.batch_size
    missing = [i for i in range(len(evaluation.dataset))
               if not (folder / f"{i}.pt").exists() and not (folder / f"{i}.none").exists()]
    for start in range(0, len(missing), size):
        indices = missing[start:start + size]
        prompts = [item_prompt(evaluation.dataset[i]) for i in indices]
        save_latents(folder, indices, evaluation.generate(prompts, evaluation.params(), evaluation.config.eval.seed))


def donor_map(evaluation: Evaluation) -> dict[int, int]:
    """Item -> the item whose direct latents it is fed: a seeded cycle over the items that have latents (so no item
    gets its own), and one of them for each item that had none (its answer opened no block in the direct pass)."""
    record_direct_latents(evaluation)
    folder = latent_dir(evaluation)
    donors = sorted(i for i in range(len(evaluation.dataset)) if (folder / f"{i}.pt").exists())
    if len(donors) < 2:
        raise EvaluationError(f"eval.ablate=shuffle: needs at least two items whose direct answer holds latent blocks; "
                              f"found {len(donors)} of {len(evaluation.dataset)}")
    order = np.random.default_rng(derive_seed(evaluation.config.eval.seed, "shuffle")).permutation(donors).tolist()
    mapping = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    return {i: mapping.get(i, order[i % len(order)]) for i in range(len(evaluation.dataset))}


class DmlrPass:
    """DMLR on the workers (each item optimised where it lands), seeded per item."""

    def __init__(self, evaluation: Evaluation, name: str):
        self.evaluation, self.settings = evaluation, DmlrSettings.from_eval(evaluation.config.eval)

    def __call__(self, batch: int, indices: list[int]) -> list[dict]:
        ev, n = self.evaluation, self.settings.tokens
        items = [ev.dataset[i] for i in indices]
        prompts = [item_prompt(item) for item in items]
        seeds = [derive_seed(ev.config.eval.seed, "dmlr", index) for index in indices]
        futures = [worker.run_dmlr.remote([prompts[i] for i in shard], self.settings, ev.params(),
                                          [seeds[i] for i in shard])
                   for worker, shard in zip(ev.group.workers, shards(len(prompts), ev.group.world_size))]
        outcomes = [outcome for result in ray.get(futures) for outcome in result]
        return [self.row(index, item, outcome) for index, item, outcome in zip(indices, items, outcomes)]

    def row(self, index: int, item: dict, outcome: dict) -> dict:
        """The answer is the optimised block (rendered `<latent×n>`) followed by the decoded text."""
        n, ev = self.settings.tokens, self.evaluation
        row = ev.row(index, item, outcome["sample"], best_reward=outcome["best_reward"],
                     best_reward_step=outcome["best_step"], initial_reward=outcome["initial_reward"],
                     search_stop=outcome["search_stop"], evaluations=outcome["evaluations"],
                     injected_patches=[len(p) for p in outcome["patches"]], latency_s=outcome["seconds"])
        row.update(response=f"<latent×{n}>" + row["response"], blocks=row["blocks"] + 1, latents=row["latents"] + n,
                   answer_tokens=row["answer_tokens"] + n + 2, tokens=row["tokens"] + n + 2,
                   forwards=outcome["forwards"])
        return row
