"""Making batches: prompts → rollouts on the workers → scored `Batch`, with online difficulty sampling.

Online difficulty sampling (docs/design.md) keeps generating groups with the current weights, `data.online_accum_size`
prompts per round, until `data.rollout_batch_size` groups have accuracy in (0, select_acc_threshold], and trains on
them in the same step, so the update stays on-policy (Monet reused stored rollouts across steps). It gives up after
`trainer.max_try_make_batch` tries with an error that says what was found. EasyR1's `algorithm.online_filtering`
is the same loop with its own rule: a group's mean reward `filter_key` in (filter_low, filter_high).
"""
from __future__ import annotations

import itertools

import numpy as np
import ray
import torch

from RL.config.schema import VAL_OVERRIDABLE
from RL.protocol import Batch, object_array
from rewards.interface import RewardInput
from rewards.manager import RewardResult
from RL.trainer.rollout_batch import build_rollout_batch, render_response
from monet_models.latent_tokens import LatentTokens
from common.seeding import derive_seed
from workers.rollout.base import PromptInput, SamplingParams


class NoQualifyingGroupsError(RuntimeError):
    pass


def rollout_settings(rollout, validation: bool = False) -> dict:
    """worker.rollout's sampling keys; in validation with every key of `val_override_config` applied over them
    (one place, so an accepted override key cannot silently miss the sampler on either engine)."""
    settings = {key: getattr(rollout, key) for key in VAL_OVERRIDABLE}
    if validation:
        settings.update(rollout.val_override_config)
    return settings


def sampling_params(rollout, response_length: int, *seed_path: int | str, validation: bool = False) -> SamplingParams:
    """The engines' SamplingParams (the vLLM engine translates the same object). The seed is derived from the
    (possibly overridden) `seed` and `seed_path`, e.g. ("step", 3, "attempt", 0) or ("validation",)."""
    settings = rollout_settings(rollout, validation)
    return SamplingParams(
        n=int(settings["n"]), temperature=float(settings["temperature"]), top_p=float(settings["top_p"]),
        top_k=int(settings["top_k"]), max_new_tokens=response_length, strategy=settings["sampling_strategy"],
        latent_size=rollout.latent_size, latent_noise_std=0.0 if validation else rollout.monet.latent_noise_std,
        latent_noise_relative=rollout.monet.latent_noise_scale == "rms",
        seed=derive_seed(int(settings["seed"]), *seed_path),
        repetition_penalty=float(settings["repetition_penalty"]),
    )


def rollout_metrics(batch: Batch, rewards: RewardResult) -> dict:
    mask = batch.tensors["response_mask"].float()
    valid = batch.tensors["attention_mask"][:, -mask.shape[1]:].float()
    metrics = {
        "rollout/response_length": float(valid.sum(-1).mean()),
        "rollout/latent_blocks": float(np.mean(batch.non_tensors["num_blocks"])),
        "rollout/truncated_block_rate": float(np.mean(batch.non_tensors["truncated_block"])),
        "rollout/clip_rate": float(np.mean([r == "length" for r in batch.non_tensors["finish_reason"]])),
    }
    if "accuracy" in rewards.components:
        metrics["reward/accuracy"] = float(correct_answers(rewards).mean())
    return metrics


def logprob_diff(parts: list[dict]) -> float:
    """Mean |actor − rollout| log-prob over the sampled text tokens, from the ranks' sums (engine agreement)."""
    return sum(p["logprob_diff_sum"] for p in parts) / max(1, sum(p["text_tokens"] for p in parts))


def correct_answers(result: RewardResult) -> np.ndarray:
    """1 where a sample's answer counts as correct: its `accuracy` component (else its overall reward) is > 0."""
    return np.array([a > 0 for a in result.components.get("accuracy", result.overall)], dtype=float)


class BatchMaker:
    def __init__(self, config, tokenizer, rollout, reward, loader, total_steps: int, policy: str):
        self.config, self.tokenizer, self.rollout, self.reward = config, tokenizer, rollout, reward
        self.policy = policy
        self.tokens = LatentTokens.from_tokenizer(tokenizer)
        self.response_length = config.data.max_response_length
        self.loader, self.total_steps = loader, total_steps

    # ---- generation ------------------------------------------------------------------------------------------
    def generate(self, items: list[dict], params: SamplingParams, tag: str, policy: str | None = None) -> Batch:
        """`params.n` samples of each item by `policy` (default: this maker's), spread over the rollout ranks; the
        samples of one item share the uid `<tag>-<item index>` (their group)."""
        for index, item in enumerate(items):
            item["uid"] = f"{tag}-{index}"
        shards = np.array_split(np.arange(len(items)), self.rollout.world_size)
        futures = [worker.generate.remote([self._prompt(items[i]) for i in shard], params, policy or self.policy)
                   for worker, shard in zip(self.rollout.workers, shards) if len(shard)]
        samples = []
        for shard, result in zip([s for s in shards if len(s)], ray.get(futures)):
            for sample in result:
                sample.prompt_index = int(shard[sample.prompt_index])
                samples.append(sample)
        batch = build_rollout_batch(items, samples, params.n, self.tokens.pad_token, params.max_new_tokens)
        batch.non_tensors["response_text"] = self._render(batch)
        return batch

    def _render(self, batch: Batch) -> np.ndarray:
        responses = batch.tensors["responses"]
        valid = batch.tensors["attention_mask"][:, -responses.shape[1]:]
        return object_array(render_response(self.tokenizer, responses[i][valid[i] > 0], self.tokens)
                            for i in range(len(batch)))

    @staticmethod
    def _prompt(item: dict) -> PromptInput:
        return PromptInput(item["input_ids"], item.get("pixel_values"), item.get("image_grid_thw"))

    def reward_inputs(self, batch: Batch) -> list[RewardInput]:
        non = batch.non_tensors
        lengths = batch.tensors["attention_mask"][:, -batch.tensors["responses"].shape[1]:].sum(-1).tolist()
        return [
            RewardInput(prompt=non["raw_prompt"][i], response=non["response_text"][i],
                        ground_truth=str(non["ground_truth"][i]), response_length=int(lengths[i]),
                        extra=dict(non["extra"][i] or {}), group_id=str(non["uid"][i]))
            for i in range(len(batch))
        ]

    def score_async(self, inputs: list[RewardInput], step: int, **context):
        return self.reward.compute.remote(inputs, step=step, total_steps=self.total_steps, **context)

    # ---- training batches ------------------------------------------------------------------------------------
    def make_training_batch(self, step: int):
        rollout = self.config.worker.rollout
        if not (rollout.online_difficulty_sampling or self.config.algorithm.online_filtering):
            params = sampling_params(rollout, self.response_length, "step", step, "attempt", 0)
            batch = self.generate(self.loader.next_batch(), params, tag=f"s{step}")
            return batch, self.score_async(self.reward_inputs(batch), step), {}
        return self._difficulty_sampled_batch(step)

    def _difficulty_sampled_batch(self, step: int):
        rollout, want = self.config.worker.rollout, self.config.data.rollout_batch_size
        kept, kept_rewards, seen = [], [], []
        tries = self.config.trainer.max_try_make_batch
        for attempt in itertools.count() if tries < 0 else range(tries):
            params = sampling_params(rollout, self.response_length, "step", step, "attempt", attempt)
            batch = self.generate(self.loader.next_batch(), params, tag=f"s{step}t{attempt}")
            result = ray.get(self.score_async(self.reward_inputs(batch), step))
            means, keep = self._kept_groups(result)
            seen.extend(means)
            rows = [g * rollout.n + k for g in keep for k in range(rollout.n)]
            if rows:
                kept.append(batch[torch.tensor(rows)])
                kept_rewards.append(select_rewards(result, rows))
            if sum(len(b) for b in kept) >= want * rollout.n:
                break
        else:
            what, keys = self._filter_words()
            raise NoQualifyingGroupsError(
                f"online difficulty sampling: only {sum(len(b) for b in kept) // rollout.n} of {want} groups had "
                f"{what} after {attempt + 1} tries (trainer.max_try_make_batch); group means seen: mean "
                f"{np.mean(seen):.2f}. Widen {keys} or raise trainer.max_try_make_batch.")
        rows = torch.arange(want * rollout.n)
        batch = Batch.concat(kept)[rows]
        result = merge_rewards(kept_rewards, want * rollout.n)
        metrics = {"rollout/difficulty_tries": attempt + 1, "rollout/group_accuracy_seen": float(np.mean(seen))}
        return batch, ray.put(result), metrics

    def _kept_groups(self, result: RewardResult) -> tuple[np.ndarray, list[int]]:
        """Each group's mean of the filtered quantity and the groups kept: accuracy in (0, select_acc_threshold]
        (Monet's online difficulty sampling), or with algorithm.online_filtering EasyR1's rule, the mean reward
        `filter_key` in the open interval (filter_low, filter_high)."""
        n, algorithm = self.config.worker.rollout.n, self.config.algorithm
        if not algorithm.online_filtering:
            means = correct_answers(result).reshape(-1, n).mean(-1)
            threshold = self.config.worker.rollout.monet.select_acc_threshold
            return means, [g for g, mean in enumerate(means) if 0 < mean <= threshold]
        key = algorithm.filter_key
        if key != "overall" and key not in result.components:
            raise ValueError(f"algorithm.filter_key: the reward has no component {key!r}; it has overall and "
                             f"{', '.join(sorted(result.components)) or 'no components'}")
        values = result.overall if key == "overall" else result.components[key]
        means = np.asarray(values, dtype=float).reshape(-1, n).mean(-1)
        return means, [g for g, mean in enumerate(means) if algorithm.filter_low < mean < algorithm.filter_high]

    def _filter_words(self) -> tuple[str, str]:
        algorithm = self.config.algorithm
        if algorithm.online_filtering:
            return (f"a mean {algorithm.filter_key} in ({algorithm.filter_low}, {algorithm.filter_high})",
                    "algorithm.filter_low/filter_high")
        return (f"accuracy in (0, {self.config.worker.rollout.monet.select_acc_threshold}]",
                "worker.rollout.monet.select_acc_threshold")

    # ---- validation ------------------------------------------------------------------------------------------
    def validate(self, dataset, step: int, tracker) -> dict:
        rollout = self.config.worker.rollout
        size = self.config.data.val_batch_size if self.config.data.val_batch_size > 0 else len(dataset)
        params = sampling_params(rollout, self.response_length, "validation", validation=True)
        accuracies, rewards, lengths, blocks, logged = [], [], [], [], []
        for start in range(0, len(dataset), size):
            items = [dict(dataset[i]) for i in range(start, min(len(dataset), start + size))]
            batch = self.generate(items, params, tag=f"val{step}-{start}")
            inputs = self.reward_inputs(batch)
            result = ray.get(self.score_async(inputs, step))
            accuracies += list(correct_answers(result))
            rewards += result.overall
            lengths += [x.response_length for x in inputs]
            blocks += list(batch.non_tensors["num_blocks"])
            logged += [{"prompt": x.prompt, "response": x.response, "ground_truth": x.ground_truth, "score": s}
                       for x, s in zip(inputs, result.overall)]
        tracker.log_generations(step, logged[: self.config.trainer.val_generations_to_log])
        return {"val/accuracy": float(np.mean(accuracies)), "val/reward": float(np.mean(rewards)),
                "val/response_length": float(np.mean(lengths)), "val/latent_blocks": float(np.mean(blocks))}


def select_rewards(result: RewardResult, rows: list[int]) -> RewardResult:
    return RewardResult([result.overall[r] for r in rows],
                        {k: [v[r] for r in rows] for k, v in result.components.items()}, dict(result.metrics))


def merge_rewards(parts: list[RewardResult], size: int) -> RewardResult:
    overall = [x for part in parts for x in part.overall][:size]
    components = {k: [x for part in parts for x in part.components.get(k, [])][:size] for k in parts[0].components}
    metrics = {k: float(np.mean([p.metrics[k] for p in parts if k in p.metrics])) for k in parts[0].metrics}
    metrics["reward/mean"] = float(np.mean(overall))
    return RewardResult(overall, components, metrics)
