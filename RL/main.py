"""CLI entry: `python -m RL.main config=path.yaml key=value ...` runs VLPO training on Ray.

Everything that can be refused is refused before any worker starts: the config, the judge's credentials, the
data (rows are validated when the datasets load). Re-running with the same `trainer.experiment_name` resumes.
"""
from __future__ import annotations

import sys
from pathlib import Path

from RL.config import ConfigError, load_config, to_yaml, total_training_steps
from tools.cli import run_cli
from tools.judges import JudgeCredentialsError, check_judge_credentials


def build_trainer(config):
    """Validate everything, write the run's config.yaml, load the data, start the workers."""
    if config.worker.rule_based_judge.api_name:
        check_judge_credentials(config.worker.rule_based_judge)
    run_dir = Path(config.trainer.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    to_yaml(config, redact=True, path=run_dir / "config.yaml")
    from monet_models import load_processor  # torch and transformers: only after the checks above
    from RL.data import build_datasets, build_loader

    processor = load_processor(config.worker.actor.model.model_path)
    train_set, val_set = build_datasets(config.data, processor)
    # With online difficulty sampling each generation round draws data.online_accum_size prompts (Monet's pool).
    online = config.worker.rollout.online_difficulty_sampling
    loader = build_loader(train_set, config.data, "train", batch_size=config.data.online_accum_size if online else None)
    total_steps = total_training_steps(config, len(train_set) // config.data.rollout_batch_size)

    from RL.trainer.vlpo_trainer import VLPOTrainer  # imports Ray and the workers: after validation

    return VLPOTrainer(config, loader, val_set, processor, total_steps)


def main(argv: list[str] | None = None) -> None:
    config = load_config(sys.argv[1:] if argv is None else argv)  # refused in a second, before torch is imported
    trainer = build_trainer(config)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()


if __name__ == "__main__":
    run_cli(main, ConfigError, JudgeCredentialsError)
