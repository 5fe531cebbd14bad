"""usage: python -m RL.train_sft [config=F.yaml] sft.stage=monet1|monet2|monet3|mirage1|mirage2 [key=value ...] [--debug]

Latent SFT on Ray, on the same FSDP policy workers as VLPO (docs/sft.md): one update rule per stage applied to the
`actor` policy, checkpoints in the run folder's step_* (merge_model.sh reads them; the folder is
`<sft.output_dir>-run`, else `<trainer.save_dir>/<trainer.experiment_name>-sft-<stage>`), metrics in its
metrics.jsonl, and at the end the model as a Hugging Face folder in `sft.output_dir`, ready for VLPO, vLLM or
the next stage. Re-running the same command resumes the run. The config is refused before torch or Ray is imported.
The default stage, mirage2, is CE with the hidden-state recurrence: what the RL rows' warm starts train (a latent
block then the boxed answer, or a given `response` in which every `<latent>` is a block). A failure is one
`error:` line (exit 2: bad input, 1: a failed run); its traceback is in <run folder>/logs/error.log, and on the
console with --debug.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from RL.checkpoint import complete_steps
from RL.config import ConfigError, derive, load_config
from RL.preflight import MODEL_KEY, preflight
from RL.run_config import RUN_INPUTS, refuse_changed_inputs, warn_changed_inputs, write_run_config
from common.cli import RunFailure, run_cli

EXPORTED = "SFT_EXPORT.json"
SFT_INPUTS = (*RUN_INPUTS, "sft.stage", "sft.latent_size", "sft.teacher_path")  # what an SFT run learns from


def sft_run_config(config):
    """The SFT run's own config: its run folder, and the actor's optimizer and model keys that sft.* overrides."""
    config = copy.deepcopy(config)
    sft, actor, trainer = config.sft, config.worker.actor, config.trainer
    sft.latent_size = sft.latent_size or config.worker.rollout.latent_size
    config.worker.rollout.latent_size = sft.latent_size  # the K its model folder records (monet_models/run_settings)
    overrides = [(actor.optim, "lr", sft.lr), (actor.optim, "lr_warmup_steps", sft.warmup_steps),
                 (actor.optim, "weight_decay", sft.weight_decay), (actor, "max_grad_norm", sft.max_grad_norm),
                 (actor.model, "freeze_vision_tower", sft.freeze_vision_tower)]
    for section, key, value in overrides:
        if value is not None:
            setattr(section, key, value)
    if sft.output_dir:  # the run that makes a named model sits next to it
        trainer.save_dir, trainer.experiment_name = str(Path(sft.output_dir).parent), Path(sft.output_dir).name + "-run"
    else:
        trainer.experiment_name = f"{trainer.experiment_name}-sft-{sft.stage}"
    trainer.max_steps = sft.steps
    derive(config)
    run_dir = Path(trainer.run_dir)
    sft.output_dir = sft.output_dir or str(run_dir / "model")
    targets = Path(sft.latent_targets).resolve() if sft.latent_targets else run_dir / "latent_targets"
    sft.latent_targets = str(targets)
    if sft.teacher_path and Path(sft.teacher_path).exists():
        sft.teacher_path = str(Path(sft.teacher_path).resolve())
    elif sft.stage == "monet2" and not sft.teacher_path:
        sft.teacher_path = actor.model.model_path
    return config


def check(config) -> None:
    """What only this entry needs: a model, rows, and monet3's teacher or finished targets."""
    errors = []
    sft = config.sft
    if not config.worker.actor.model.model_path:
        errors.append("worker.actor.model.model_path: required (the model to train)")
    if not config.data.train_files:
        errors.append("data.train_files: required (the SFT rows)")
    if sft.stage == "monet3" and teacher_needed(config) and not Path(sft.teacher_path or "/nonexistent").is_dir():
        errors.append(f"sft.teacher_path: monet3 learns the stage-2 model's latents, and {sft.latent_targets} holds "
                      f"none yet; give the stage-2 model folder (got {sft.teacher_path!r})")
    if sft.stage == "monet2" and not Path(sft.teacher_path).exists():
        errors.append(f"sft.teacher_path: no such model folder {sft.teacher_path}")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


def teacher_needed(config) -> bool:
    """monet2 learns from its teacher throughout; monet3 only until the stage-2 latents are written."""
    sft = config.sft
    return sft.stage == "monet2" or (sft.stage == "monet3" and
                                     not (Path(sft.latent_targets) / "MANIFEST.json").is_file())


def build_trainer(config):
    """Write the run's config.yaml, load the rows, start the workers."""
    write_run_config(config)
    from monet_models import load_processor  # torch and transformers: only after the checks above
    from RL.data.sft_dataset import sft_dataset

    processor = load_processor(config.worker.actor.model.model_path)
    dataset = sft_dataset(config, processor, config.sft.latent_size)
    per_epoch = len(dataset) // config.sft.batch_size
    if per_epoch < 1:
        raise ConfigError(f"sft.batch_size: {config.sft.batch_size} rows per step, but the data has {len(dataset)}")
    total_steps = config.sft.steps or config.sft.epochs * per_epoch

    from RL.trainer.sft import SFTTrainer  # imports Ray and the workers: after validation

    return SFTTrainer(config, dataset, processor, total_steps)


def finished(config) -> bool:
    """Whether the newest checkpoint already reached the run's last step (then only the export is left)."""
    steps = complete_steps(config.trainer.run_dir) if config.trainer.resume else []
    if not steps:
        return False
    from RL.checkpoint import read_summary

    total = config.sft.steps or read_summary(steps[-1][1]).get("total_steps")
    return total is not None and steps[-1][0] >= total


def export_model(config) -> Path:
    """The newest checkpoint merged into sft.output_dir (a Hugging Face folder), once per checkpoint."""
    steps = complete_steps(config.trainer.run_dir)
    if not steps:
        raise RunFailure(f"{config.trainer.run_dir}: no complete checkpoint to export; run the same command again")
    step, folder = steps[-1]
    out = Path(config.sft.output_dir)
    marker = {"run": str(config.trainer.run_dir), "step": step}
    if (out / EXPORTED).is_file() and json.loads((out / EXPORTED).read_text()) == marker:
        return out
    from RL.model_export import merge_checkpoint  # imports torch: only once the run is done

    merge_checkpoint(folder, "actor", out)
    (out / EXPORTED).write_text(json.dumps(marker) + "\n")
    print(f"latent SFT ({config.sft.stage}) model written to {out}")
    return out


def run_sft(config) -> Path:
    """Train (or resume) the SFT run of `config` and return the exported model folder."""
    config = sft_run_config(config)
    check(config)
    if finished(config):
        refuse_changed_inputs(config, "is complete", SFT_INPUTS, "sft.steps")
        print(f"run {config.trainer.experiment_name} is complete; raise sft.steps to continue")
    else:
        warn_changed_inputs(config, SFT_INPUTS)
        models = (MODEL_KEY, "sft.teacher_path") if teacher_needed(config) else (MODEL_KEY,)
        preflight(config, models, roles=("actor",))  # SFT starts neither an engine nor a reference
        trainer = build_trainer(config)
        try:
            trainer.fit()
        finally:
            trainer.shutdown()
    return export_model(config)


def main(argv: list[str] | None = None) -> int:
    config = load_config(sys.argv[1:] if argv is None else argv, require_inputs=False)
    check(sft_run_config(config))  # refused in a second, before torch is imported
    run_sft(config)
    return 0


if __name__ == "__main__":
    run_cli(main, ConfigError, usage=__doc__)
