"""usage: python -m RL.evaluate MODEL_DIR data.val_files=FILE [method=direct|dmlr|rmm] [ablate=zero,shuffle,noise,text]
                            [name=NAME] [strategy=monet|greedy] [config=file.yaml] [dotted.key=value ...] [--debug]

Evaluates MODEL_DIR on the items of data.val_files (project rows, DMLR's JSON list or a VLMEvalKit TSV) on Ray
workers (trainer.n_gpus_per_node of them), judged like training (worker.rule_based_judge). `method`, `ablate`, `name`
and `strategy` stand for eval.method, eval.ablate, eval.name and eval.strategy; every eval.* key is in
RL/config/schema.py:EvalConfig. Results go to runs/eval/<name>/ (per-item jsonl per pass, summary.json, summary.md);
re-running resumes. A failure is one `error:` line (exit 2: bad input, 1: a failed run); its traceback is in
runs/eval/<name>/logs/error.log, and on the console with --debug.
"""
from __future__ import annotations

import logging
import sys

from RL.config import ConfigError, load_config
from RL.evaluate import EvaluationError
from RL.evaluate.memory import check_memory_credentials
from RL.evaluate.stats import markdown
from common.cli import UsageError, log_errors_to, run_cli
from rewards.judges import JudgeCredentialsError, check_judge_credentials
from common.model_folder import check_model_folder

logger = logging.getLogger(__name__)
SHORT_KEYS = {"method": "eval.method", "ablate": "eval.ablate", "name": "eval.name", "strategy": "eval.strategy"}


def expand(argv: list[str]) -> list[str]:
    """Config items from the command line: a leading MODEL_DIR and the short keys become dotted keys."""
    items = []
    for position, item in enumerate(argv):
        if "=" not in item:
            if position or item.startswith("-"):
                raise UsageError(f"{item!r}: expected MODEL_DIR first, then key=value items (see --help)")
            items.append(f"worker.actor.model.model_path={item}")
            continue
        key, value = item.split("=", 1)
        items.append(f"{SHORT_KEYS.get(key, key)}={value}")
    return items


def check(config) -> None:
    """What evaluation needs beyond the shared checks; `worker.rollout.name=auto` becomes native where the method
    replaces latents (only the native engine can)."""
    errors, model = [], config.worker.actor.model.model_path
    if not model:
        errors.append("worker.actor.model.model_path: required (MODEL_DIR, the model folder to evaluate)")
    if not config.data.val_files:
        errors.append("data.val_files: required (the items to evaluate)")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    ev = config.eval
    if config.worker.rollout.name == "auto" and (ev.method == "dmlr" or ev.ablate.replace("text", "").strip(",")):
        logger.warning("worker.rollout.name=auto: using the native engine (this method replaces latents)")
        config.worker.rollout.name = "native"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 0
    config = load_config(expand(argv), require_inputs=False)  # refused in a second, before torch is imported
    check(config)
    check_judge_credentials(config.worker.rule_based_judge)
    check_memory_credentials(config.eval)
    check_model_folder(config.worker.actor.model.model_path, "worker.actor.model.model_path")
    from RL.evaluate.runner import evaluate, output_folder  # torch, transformers and Ray: only after the checks

    log_errors_to(output_folder(config))
    summary = evaluate(config)
    print(markdown(summary), end="")
    print(f"results: {summary['folder']}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(main, ConfigError, JudgeCredentialsError, EvaluationError, usage=__doc__)
