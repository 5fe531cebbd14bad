"""The configuration tree: typed dataclass defaults -> `config=path.yaml` -> dotted CLI overrides (OmegaConf).

    cfg = load_config(["config=examples/config/vlpo_monet.yaml", "worker.rollout.n=4"])
    python -m RL.config --print [config=...] [overrides...]     # the resolved reference, secrets redacted

Key names follow EasyR1 and Monet's `vlpo_train.sh` so their users' scripts carry over. Every problem (unknown key,
wrong type, impossible combination) is refused here, before any worker starts, with the full dotted key in the message.
Fields declared with `init=False` are derived: they are filled in `finalize` (the only place) and cannot be set.

schema.py holds the sections, loading.py the layering and derived fields, checks.py what is refused.
"""
from RL.config.checks import get_dotted, problems
from RL.config.loading import (derive, derived_keys, finalize, load_config, redact_secrets, suggest_keys, to_yaml,
                               total_training_steps)
from RL.config.schema import (CHOICES, ActorConfig, AlgorithmConfig, ConfigError, DataConfig, FSDPConfig,
                              LoraConfig, ModelConfig, MonetConfig, OffloadConfig, OptimConfig, PlacementConfig,
                              RefConfig, RolloutConfig, RootConfig, SFTConfig, TrainerConfig, WorkerConfig)
from RL.config.cli import main
from common.secrets import NOT_SECRET, is_secret_key  # the one home of the secret rules

__all__ = ["ConfigError", "RootConfig", "DataConfig", "WorkerConfig", "ActorConfig", "ModelConfig", "LoraConfig",
           "OptimConfig", "FSDPConfig", "OffloadConfig", "RolloutConfig", "MonetConfig", "RefConfig", "PlacementConfig",
           "AlgorithmConfig", "TrainerConfig", "SFTConfig", "CHOICES", "NOT_SECRET", "load_config", "finalize", "derive", "derived_keys", "suggest_keys", "to_yaml",
           "total_training_steps", "is_secret_key", "redact_secrets", "problems", "get_dotted", "main"]
