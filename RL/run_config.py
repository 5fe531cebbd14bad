"""A run folder's config.yaml: the resolved config (secrets redacted) of the command that last trained the run.

Written before the run's first step (and again on each resume), read when the same run is started again: a command
whose data or model differ from the run's is told which keys differ, instead of "complete" (a finished run trains
nothing on them) or a silent resume on other inputs.
"""
from __future__ import annotations

import logging
from pathlib import Path

import yaml

from RL.checkpoint import complete_steps
from RL.config import ConfigError, to_yaml
from RL.tracking import flat

_UNSET = object()  # a key one side lacks

logger = logging.getLogger(__name__)
RUN_CONFIG = "config.yaml"
# What a run is trained on and from (dotted sections or keys)
RUN_INPUTS = ("data", "worker.actor.model", "worker.rollout.latent_size")


def write_run_config(config) -> Path:
    """`<run_dir>/config.yaml` (redacted), the run folder made if needed; returns its path."""
    path = Path(config.trainer.run_dir) / RUN_CONFIG
    to_yaml(config, redact=True, path=path)
    return path


def changed_settings(config, keys: tuple[str, ...] = RUN_INPUTS) -> list[str]:
    """`key: old -> new` for each setting under `keys` whose value in the run folder's config.yaml is not this
    config's; [] for a run folder without one."""
    path = Path(config.trainer.run_dir) / RUN_CONFIG
    if not path.is_file():
        return []
    saved, now = flat(yaml.safe_load(path.read_text()) or {}), flat(yaml.safe_load(to_yaml(config)) or {})
    wanted = [key for key in sorted(set(saved) | set(now))
              if any(key == name or key.startswith(name + ".") for name in keys)]
    return [f"{key}: {saved.get(key, 'unset')!r} -> {now.get(key, 'unset')!r}" for key in wanted
            if saved.get(key, _UNSET) != now.get(key, _UNSET)]


def refuse_changed_inputs(config, state: str, keys: tuple[str, ...], steps_key: str) -> None:
    """ConfigError naming the changed keys when a finished run (`state`: "is complete at step N") is run again with
    other data or another model, which it would not train on."""
    changed = changed_settings(config, keys)
    if changed:
        raise ConfigError(
            f"run {config.trainer.experiment_name} {state}, but this command changes what it was trained on "
            f"(its {RUN_CONFIG}):\n  " + "\n  ".join(changed) + "\ngive a new trainer.experiment_name to train with "
            f"these settings, set trainer.resume=false to start this run over, or drop the changes (and raise "
            f"{steps_key} to continue it)")


def warn_changed_inputs(config, keys: tuple[str, ...] = RUN_INPUTS) -> None:
    """A resumed run goes on with this command's settings: a warning names the data or model keys that changed."""
    steps = complete_steps(config.trainer.run_dir) if config.trainer.resume else []
    changed = changed_settings(config, keys) if steps else []
    if changed:
        logger.warning("resuming %s from step %d with other data or model settings than before: %s",
                       config.trainer.experiment_name, steps[-1][0], "; ".join(changed))
