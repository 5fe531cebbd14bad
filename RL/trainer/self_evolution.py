"""The proposer–solver self-evolution trainer (iReasoner / EvoLMM) on the same workers as VLPO.

One step, batched: B unlabeled images → the proposer writes `questions_per_image` questions per image → the solver
answers each question N times (with latent blocks under `sampling_strategy=monet`) → answer histogram, entropy and
majority → solver rewards (soft self-consistency, then step agreement after the warm-up) and the proposer's entropy
band-pass → advantages (EMA baseline or GRPO) → PPO updates of the solver adapter every step and of the proposer
adapter every `proposer_update_freq` steps. Both adapters sit on one frozen base; the reference is the base itself.
The KL to it is the sampled-token estimate or the released full-vocabulary KL (`self_evolution.kl`), and each role's
β moves once per update or, as released, after every optimizer step (`self_evolution.kl_coef_update`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import ray
import torch

from algorithms import ExponentialKLController, compute_advantages, ema_baseline
from RL.data.format_prompt import IMAGE_MARKER, FormatPrompt, render_prompt
from RL.protocol import Batch
from rewards.config import RewardConfig
from rewards.ireasoner import STEP_STATS, solver_answer
from rewards.ireasoner_parse import parse_question
from rewards.proposer import proposer_reward
from rewards.self_consistency import answer_stats
from RL.trainer.base import RayTrainer, mean_dicts, timed
from RL.trainer.batching import BatchMaker, logprob_diff, sampling_params
from workers.self_evolution_worker import SelfEvolutionWorker

ROLES = ("solver", "proposer")
SOLVER_REWARD = "rewards/ireasoner.py:ireasoner_solver_reward"


def solver_reward_config(config) -> RewardConfig:
    """The reward worker's section for the solver: the iReasoner reward with the self_evolution settings."""
    se = config.self_evolution
    embedder = f"token:{config.worker.actor.model.model_path}" if se.embedder == "token" else se.embedder
    kwargs = {"variant": se.variant, "embedder": embedder, "gamma": se.soft_gamma, "len_penalty": se.len_penalty,
              "target_words": se.target_words, "w_start": se.step_weight_start, "w_end": se.step_weight_end,
              "warmup_frac": se.warmup_frac, "step_temperature": se.step_temperature,
              "step_position_decay": se.step_position_decay, "step_density_gamma": se.step_density_gamma}
    return RewardConfig(reward_function=SOLVER_REWARD, reward_function_kwargs=kwargs)


class SelfEvolutionTrainer(RayTrainer):
    title = "self-evolution"
    policy_names = ROLES
    worker_class = SelfEvolutionWorker  # the released KL options (self_evolution.kl, kl_coef_update)

    def __init__(self, config, pool, val_dataset, processor, total_steps: int):
        self.pool, self.val_dataset, self.processor = pool, val_dataset, processor
        super().__init__(config, total_steps, has_validation=val_dataset is not None)
        self.se = se = config.self_evolution
        self.templates = {"proposer": FormatPrompt(se.proposer_prompt), "solver": FormatPrompt(se.solver_prompt)}
        self.kl = {role: ExponentialKLController(se.kl_coef, se.kl_target, se.kl_rate) for role in ROLES}
        self.baselines = {role: 0.0 for role in ROLES}
        self.schedule_origin = 0  # the step the warm-up counts from; stored, so a resume does not restart it

    def start_workers(self) -> None:
        super().start_workers()
        self.reward = self.start_reward_worker(solver_reward_config(self.config))
        self.batches = BatchMaker(self.config, self.processor.tokenizer, self.rollout, self.reward, None,
                                  self.total_steps, policy="solver")

    # ---- one step --------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        timing: dict = {}
        self.pop_busy_time()
        with timed(timing, "step"):
            with self.generation(timing):  # the proposer's and the solver's rollouts: one phase (sync before it)
                with timed(timing, "propose"):
                    images = [self.pool.sample((step - 1) * self.config.data.rollout_batch_size + i + 1).image
                              for i in range(self.config.data.rollout_batch_size)]
                    proposals = self.propose(images, step)
                    questions = [parse_question(text) for text in proposals.non_tensors["response_text"]]
                with timed(timing, "solve"):
                    answers = self.solve([images[i // self.se.questions_per_image] for i in range(len(questions))],
                                         questions, f"s{step}", self.train_params(step))
            with timed(timing, "score"):
                rewards = ray.get(self.batches.score_async(self.batches.reward_inputs(answers), step,
                                                           start_step=self.schedule_origin))
                stats = question_stats(answers, self.config.worker.rollout.n, self.se.entropy_mu, self.se.entropy_sigma)
            metrics = {**step_metrics(proposals, answers, rewards, stats)}
            with timed(timing, "update_solver"):
                metrics.update(self.update("solver", answers, np.asarray(rewards.overall)))
            if step % self.se.proposer_update_freq == 0:
                with timed(timing, "update_proposer"):
                    metrics.update(self.update("proposer", proposals, stats["proposer_reward"]))
        busy = self.pop_busy_time()
        timing["timing_s/worker_busy"] = busy
        timing["timing_s/driver_and_ray"] = timing["timing_s/step"] - busy
        tokens = float(answers.tensors["attention_mask"].sum() + proposals.tensors["attention_mask"].sum())
        return {"step": step, **metrics, **timing, "solver/step_weight": float(np.mean(rewards.components["step_weight"])),
                "perf/throughput": tokens / timing["timing_s/step"] / self.world_size}

    def train_params(self, step: int):
        return sampling_params(self.config.worker.rollout, self.config.data.max_response_length, "solve", step)

    def propose(self, images: list, step: int) -> Batch:
        rollout, se = self.config.worker.rollout, self.se
        params = dataclasses.replace(
            sampling_params(rollout, se.proposer_max_new_tokens, "propose", step),
            n=se.questions_per_image, temperature=se.proposer_temperature, strategy="sample", latent_noise_std=0.0)
        items = [self.item("proposer", "", image) for image in images]
        return self.batches.generate(items, params, tag=f"s{step}p", policy="proposer")

    def solve(self, images: list, questions: list[str], tag: str, params) -> Batch:
        items = [self.item("solver", question, image) for question, image in zip(questions, images)]
        return self.batches.generate(items, params, tag=tag, policy="solver")

    def item(self, role: str, content: str, image, ground_truth: str = "") -> dict:
        """A rollout prompt: the image, then the role's template around `content` (iReasoner's [image, text])."""
        raw_prompt = render_prompt(self.processor, IMAGE_MARKER + self.templates[role](content))
        data = self.config.data
        size = {"shortest_edge": data.min_pixels, "longest_edge": data.max_pixels}
        inputs = self.processor(text=[raw_prompt], images=[image], size=size, return_tensors="pt")
        return {"input_ids": inputs["input_ids"][0], "pixel_values": inputs["pixel_values"],
                "image_grid_thw": inputs["image_grid_thw"], "raw_prompt": raw_prompt, "ground_truth": ground_truth,
                "extra": {"question": content}}

    # ---- updates ---------------------------------------------------------------------------------------------
    def update(self, role: str, batch: Batch, scores: np.ndarray) -> dict:
        """Old and reference log-probs, advantages, one PPO update of `role`'s adapter, then its β moves."""
        shards, key = self.policy.scatter(batch), f"s{self.step}-{role}"
        agreement = self.policy.dispatch("compute_log_probs", shards, role, key)
        self.policy.dispatch("compute_ref_log_probs", shards, key)
        per_rank = [{"advantages": part} for part in self.advantages(role, batch, scores).chunk(self.world_size)]
        beta, per_step = self.kl[role].value, self.se.kl_coef_update == "per_step"
        extra = {"kl_state": self.kl[role].state_dict()} if per_step else {}
        metrics = mean_dicts(self.policy.dispatch("update_policy", shards, role, key, per_rank=per_rank,
                                                  mini_batch_size=self.mini_batch_size(role), kl_coef=beta, **extra))
        after = metrics.pop("actor/kl_coef_after", None)
        if per_step:  # the workers moved β after each optimizer step, all alike
            self.kl[role].load_state_dict({"value": after})
        else:
            self.kl[role].update(metrics.get("actor/kl_loss", 0.0))
        renamed = {f"{role}/{name.split('/', 1)[1]}": value for name, value in metrics.items()}
        return {**renamed, f"{role}/kl_coef": beta, f"{role}/baseline": self.baselines[role],
                f"{role}/logprob_diff": logprob_diff(agreement)}

    def advantages(self, role: str, batch: Batch, scores: np.ndarray) -> torch.Tensor:
        mask = batch.tensors["response_mask"].float()
        if self.se.advantage == "grpo":  # a group: the N answers of a question, or the questions of an image
            advantages, _ = compute_advantages("grpo", torch.as_tensor(scores, dtype=torch.float32), mask,
                                               list(batch.non_tensors["uid"]))
            return advantages
        advantages, _, self.baselines[role] = ema_baseline(scores, mask, self.baselines[role], self.se.ema_momentum)
        return advantages

    def mini_batch_size(self, role: str) -> int:
        """Samples per rank per optimizer step: one (sequential, as released), or as in VLPO
        `worker.actor.global_batch_size` prompts (solver: questions x N answers; proposer: images x questions)."""
        if self.se.update == "sequential":
            return 1
        per_prompt = self.config.worker.rollout.n if role == "solver" else self.se.questions_per_image
        return max(1, self.config.worker.actor.global_batch_size * per_prompt // self.world_size)

    # ---- validation on held-out labeled data -----------------------------------------------------------------
    def validate(self, step: int) -> dict:
        """The solver answers each held-out question N times; its majority answer is judged against the label."""
        rollout = self.config.worker.rollout
        # every val_override_config key but n: the majority vote needs the solver's N = worker.rollout.n answers
        params = dataclasses.replace(sampling_params(rollout, self.config.data.max_response_length, "validation",
                                                     validation=True), n=rollout.n)
        rows = [self.val_dataset[i] for i in range(len(self.val_dataset))]
        questions = [row["question"].replace(IMAGE_MARKER, "").strip() for row in rows]
        batch = self.solve([row["images"][0] for row in rows], questions, f"val{step}", params)
        answers = [solver_answer(x.response) for x in self.batches.reward_inputs(batch)]
        n = rollout.n
        majorities = [answer_stats(answers[i * n:(i + 1) * n]).majority for i in range(len(rows))]
        truths = [str(row["ground_truth"]) for row in rows]
        verdicts = ray.get(self.reward.judge_answers.remote(questions, majorities, truths))
        per_sample = ray.get(self.reward.judge_answers.remote(
            [q for q in questions for _ in range(n)], answers, [t for t in truths for _ in range(n)]))
        shares = [answer_stats(answers[i * n:(i + 1) * n]).counts[majorities[i]] / n for i in range(len(rows))]
        return {"val/majority_accuracy": float(np.mean(verdicts)), "val/accuracy": float(np.mean(per_sample)),
                "val/self_consistency": float(np.mean(shares))}

    # ---- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"baselines": dict(self.baselines), "kl": {role: c.state_dict() for role, c in self.kl.items()},
                "schedule_origin": self.schedule_origin, "pool_position": self.step * self.config.data.rollout_batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.baselines = dict(state["baselines"])
        for role, controller in self.kl.items():
            controller.load_state_dict(state["kl"][role])
        self.schedule_origin = state["schedule_origin"]

    def shutdown(self) -> None:
        super().shutdown()
        ray.kill(self.reward)


def question_stats(answers: Batch, n: int, mu: float, sigma: float) -> dict:
    """Per question: majority share, answer entropy and the proposer's band-pass reward of its N answers."""
    texts = answers.non_tensors["response_text"]
    per_question = [[solver_answer(t) for t in texts[i:i + n]] for i in range(0, len(texts), n)]
    stats = [answer_stats(group) for group in per_question]
    return {"majority_share": np.array([s.counts[s.majority] / n for s in stats]),
            "entropy": np.array([s.entropy for s in stats]),
            "proposer_reward": np.array([proposer_reward(group, mu, sigma)["overall"] for group in per_question])}


def step_metrics(proposals: Batch, answers: Batch, rewards, stats: dict) -> dict:
    components = rewards.components
    metrics = {
        "solver/self_consistency": float(stats["majority_share"].mean()),
        "solver/answer_entropy": float(stats["entropy"].mean()),
        "solver/reward": float(np.mean(rewards.overall)),
        "solver/soft": float(np.mean(components["soft"])),
        "solver/step": float(np.mean(components["step"])),
        "solver/unparseable_rate": float(np.mean(["<answer>" not in t for t in answers.non_tensors["response_text"]])),
        "solver/response_length": float(answers.tensors["response_mask"].sum(-1).float().mean()),
        "solver/latent_blocks": float(np.mean(answers.non_tensors["num_blocks"])),
        "proposer/reward": float(stats["proposer_reward"].mean()),
        "proposer/question_length": float(proposals.tensors["response_mask"].sum(-1).float().mean()),
        "proposer/unparseable_rate": float(np.mean([
            "<question>" not in t or "</question>" not in t for t in proposals.non_tensors["response_text"]])),
    }
    metrics.update({f"step_agreement/{key}": float(np.mean(components[f"step_{key}"])) for key in STEP_STATS})
    return metrics
