"""What a pass works with: the `Evaluation` (config, items, judge, workers, output folder) and how a batch is split
over the workers. Its own module so the passes (`passes.py`, `rmm.py`) and the runner that drives them all import it,
and none of them imports another (no cycle)."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from RL.trainer.rollout_batch import render_response
from monet_models.latent_tokens import LatentTokens
from common.seeding import derive_seed
from workers.rollout.base import SamplingParams


@dataclass
class Evaluation:
    """What every pass needs: the config, the items, the judge, the workers and the output folder."""

    config: object
    processor: object
    dataset: object
    judge: object
    group: object  # the Ray workers, or None when an endpoint answers
    folder: Path
    endpoint: object = None  # endpoint.EndpointAnswers when eval.endpoint is set

    @functools.cached_property
    def tokens(self) -> LatentTokens:
        return LatentTokens.from_tokenizer(self.processor.tokenizer)

    def params(self, **changes) -> SamplingParams:
        """Greedy decoding (`monet`: greedy text with latent blocks) with the evaluation's length and K."""
        ev = self.config.eval
        base = SamplingParams(strategy=ev.strategy, temperature=0.0 if ev.strategy == "monet" else 1.0,
                              max_new_tokens=ev.max_new_tokens or self.config.data.max_response_length,
                              latent_size=self.config.worker.rollout.latent_size, seed=ev.seed)
        return dataclasses.replace(base, **changes)

    def generate(self, prompts: list, params: SamplingParams, seed: int, given: list | None = None) -> list:
        """One sample per prompt, the prompts split evenly over the workers; in prompt order. `given[i]` (latents
        fed to prompt i instead of its own) makes the override `given`."""
        futures = []
        for worker, shard in zip(self.group.workers, shards(len(prompts), self.group.world_size)):
            latents = {} if given is None else {"latent_override": "given",
                                                "given_latents": tuple(given[i] for i in shard)}
            shard_params = dataclasses.replace(params, seed=derive_seed(seed, "shard", int(shard[0])), **latents)
            futures.append(worker.generate.remote([prompts[i] for i in shard], shard_params, "actor"))
        return [sample for result in ray.get(futures) for sample in result]

    def render(self, sample) -> str:
        return render_response(self.processor.tokenizer, sample.response_ids, self.tokens)

    def row(self, index: int, item: dict, sample, **fields) -> dict:
        """The per-item result of one response (cost fields default to those of a plain decode)."""
        return self.text_row(index, item, self.render(sample), sample.finish_reason, len(sample.response_ids),
                             len(sample.block_positions), sample.num_latents, **fields)

    def text_row(self, index: int, item: dict, response: str, finish_reason: str, tokens: int, blocks: int,
                 latents: int, **fields) -> dict:
        """The per-item result of a rendered response (what an endpoint returns: text and its token count)."""
        extra, truth = item.get("extra") or {}, str(item["ground_truth"])
        options = extra.get("options") if isinstance(extra.get("options"), dict) else {}  # a TSV's choices
        return {"index": index, "id": item["row_id"], "question": item["question"], "ground_truth": truth,
                "ground_truth_text": options.get(truth), "category": extra.get(self.config.eval.category_column),
                "prompt": item["raw_prompt"], "response": response, "blocks": blocks, "latents": latents,
                "answer_tokens": tokens, "tokens": tokens, "forwards": tokens, "finish_reason": finish_reason,
                **fields}


def shards(count: int, world: int) -> list[np.ndarray]:
    return [shard for shard in np.array_split(np.arange(count), world) if len(shard)]
