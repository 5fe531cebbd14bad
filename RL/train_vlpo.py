"""usage: python -m RL.train_vlpo config=path.yaml [dotted.key=value ...] [--debug]

Runs VLPO training on Ray (every key: `python -m RL.config --print`, README section 3).

Everything that can be refused is refused before any worker starts: the config, the judge's credentials, the model
folder, the checkpoint a resume reads, the run folder, the data (rows are validated when the datasets load).
Re-running with the same `trainer.experiment_name` resumes; a run that already reached its last step says so in a
second, without starting Ray. A failure is one `error:` line (exit 2: bad input, 1: a failed run); its traceback is
in <run folder>/logs/error.log, and on the console with --debug.
"""
from __future__ import annotations

import logging
import sys

from RL.checkpoint import complete_steps, read_summary
from RL.config import ConfigError, load_config, total_training_steps
from RL.preflight import preflight
from RL.run_config import RUN_INPUTS, refuse_changed_inputs, warn_changed_inputs, write_run_config
from common.cli import run_cli
from rewards.judges import JudgeCredentialsError, check_judge_credentials

logger = logging.getLogger(__name__)


def finished_message(config) -> str | None:
    """'run X is complete at step N ...' when the newest checkpoint already reached the run's last step; a
    ConfigError naming the keys when this command's data or model settings are not the run's."""
    steps = complete_steps(config.trainer.run_dir) if config.trainer.resume else []
    if not steps:
        return None
    step, folder = steps[-1]
    total = config.trainer.max_steps or read_summary(folder).get("total_steps")
    if total is None or step < total:
        return None
    refuse_changed_inputs(config, f"is complete at step {step} ({folder})", RUN_INPUTS, "trainer.max_steps")
    return (f"run {config.trainer.experiment_name} is complete at step {step} ({folder}); raise trainer.max_steps "
            "to continue, or set trainer.resume=false to start over")


def prepare_run(config) -> None:
    """Checks that need no heavy import, then the run folder and its redacted config.yaml."""
    if config.worker.rule_based_judge.api_name:
        check_judge_credentials(config.worker.rule_based_judge)
    rollout = config.worker.rollout
    if rollout.sampling_strategy == "monet" and rollout.monet.latent_noise_std == 0:
        logger.warning("worker.rollout.monet.latent_noise_std=0: latents are the policy's means on-policy, so the "
                       "latent Gaussian terms have no gradient and VLPO trains the text only (Monet's behaviour); "
                       "set a small noise to train the latents too")
    write_run_config(config)


def build_trainer(config):
    """Validate everything, load the data, write the run's config.yaml, start the workers. The data loads before
    anything is written, so a refused data set leaves no run folder behind."""
    from monet_models import load_processor  # torch and transformers: only after the config checks
    from RL.data import build_datasets, build_loader

    processor = load_processor(config.worker.actor.model.model_path)
    train_set, val_set = build_datasets(config.data, processor)
    prepare_run(config)
    # With online difficulty sampling each generation round draws data.online_accum_size prompts (Monet's pool).
    online = config.worker.rollout.online_difficulty_sampling
    loader = build_loader(train_set, config.data, "train", batch_size=config.data.online_accum_size if online else None)
    total_steps = total_training_steps(config, len(train_set) // config.data.rollout_batch_size)

    from RL.trainer.vlpo import VLPOTrainer  # imports Ray and the workers: after validation

    return VLPOTrainer(config, loader, val_set, processor, total_steps)


def run(config, build) -> int:
    """Say so if the run is already complete; otherwise build the trainer, fit, and always shut the workers down."""
    message = finished_message(config)
    if message:
        print(message)
        return 0
    warn_changed_inputs(config)
    preflight(config)
    trainer = build(config)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    config = load_config(sys.argv[1:] if argv is None else argv)  # refused in a second, before torch is imported
    return run(config, build_trainer)


if __name__ == "__main__":
    run_cli(main, ConfigError, JudgeCredentialsError, usage=__doc__)
