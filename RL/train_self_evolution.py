"""usage: python -m RL.train_self_evolution config=path.yaml [dotted.key=value ...] [--debug]

Runs proposer–solver self-evolution (iReasoner / EvoLMM) on Ray. The model improves from unlabeled images
(`data.image_dir`, optionally `data.include_subfolders`); labeled data in `data.val_files` is held out and only
measured. Everything refusable is refused before Ray starts, as in RL.train_vlpo, and re-running with the same
`trainer.experiment_name` resumes. A failure is one `error:` line (exit 2: bad input, 1: a failed run); its
traceback is in <run folder>/logs/error.log, and on the console with --debug.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from RL.config import ConfigError, load_config
from RL.train_vlpo import prepare_run, run
from common.cli import run_cli
from rewards.judges import JudgeCredentialsError


def check(config) -> None:
    """What only this trainer needs; the shared checks ran when the config loaded."""
    errors = []
    if not config.worker.actor.model.model_path:
        errors.append("worker.actor.model.model_path: required (the base Qwen2.5-VL model folder)")
    if not config.data.image_dir or not Path(config.data.image_dir).is_dir():
        errors.append(f"data.image_dir: a folder of unlabeled images is required, got {config.data.image_dir!r}")
    if config.worker.actor.model.lora.rank < 1:
        errors.append("worker.actor.model.lora.rank: the solver and the proposer are two LoRA adapters on one base; "
                      "set a rank >= 1")
    se, world = config.self_evolution, config.world_size
    if (config.data.rollout_batch_size * se.questions_per_image) % world:
        errors.append(f"data.rollout_batch_size, self_evolution.questions_per_image: images x questions "
                      f"({config.data.rollout_batch_size * se.questions_per_image}) must split evenly over {world} devices")
    if se.advantage == "grpo" and se.questions_per_image < 2:
        errors.append("self_evolution.advantage, self_evolution.questions_per_image: grpo compares the questions of "
                      "an image, so the proposer needs questions_per_image >= 2")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


def build_trainer(config):
    """Load the image pool and held-out rows, then write the run's config.yaml (a refused input writes nothing)."""
    from monet_models import load_processor  # torch and transformers: only after the config checks
    from RL.data import ImagePool, RLPromptDataset

    data = config.data
    processor = load_processor(config.worker.actor.model.model_path)
    pool = ImagePool(data.image_dir, data.include_subfolders, seed=data.seed, min_pixels=data.min_pixels,
                     max_pixels=data.max_pixels)
    # data.image_dir is the unlabeled pool here, so held-out files resolve relative image paths from their own folder
    val_set = RLPromptDataset(data.val_files, processor, data, max_samples=data.val_max_samples, name="val",
                              image_dir="") if data.val_files else None
    total_steps = config.trainer.max_steps or config.trainer.total_epochs * math.ceil(len(pool) / data.rollout_batch_size)
    prepare_run(config)

    from RL.trainer.self_evolution import SelfEvolutionTrainer  # imports Ray and the workers: after validation

    return SelfEvolutionTrainer(config, pool, val_set, processor, total_steps)


def main(argv: list[str] | None = None) -> int:
    config = load_config(sys.argv[1:] if argv is None else argv, require_inputs=False)
    check(config)
    return run(config, build_trainer)


if __name__ == "__main__":
    run_cli(main, ConfigError, JudgeCredentialsError, usage=__doc__)
