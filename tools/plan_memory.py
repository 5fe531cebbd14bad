"""Print a run's memory plan: per device, per phase (load, rollout, scoring, update, sync), each component and the
peak, from the model's config.json (no weights read) and the run's config (RL/memory_plan.py, docs/scale.md).

    python -m tools.plan_memory [config=path.yaml] [dotted.key=value ...] [--device-gb N] [--shape 3b|7b] [--json]

--device-gb N   plan for GPUs of N GiB (offloaded state then counts in host memory); default: this machine's first
                GPU, else host memory per rank (trainer.n_gpus_per_node processes per node)
--shape 3b|7b   the released Qwen2.5-VL-3B / -7B sizes instead of worker.actor.model.model_path's config.json
--json          one JSON object instead of the table
Exit status 2 (one `error:` line) when the plan does not fit, naming the keys to change.
"""
from __future__ import annotations

import json
import sys

from common.cli import ArgumentParser, InputError, run_cli
from RL.config import ConfigError, load_config
from RL.memory_plan import Device, ModelDims, plan_memory


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tools.plan_memory", description=__doc__)
    parser.add_argument("--device-gb", type=float, default=None)
    parser.add_argument("--shape", choices=("3b", "7b"), default=None)
    parser.add_argument("--json", action="store_true")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = load_config(overrides, require_inputs=False)
    dims = None
    if args.shape:
        from monet_models.tiny_model import released_config

        dims = ModelDims.from_config(released_config(args.shape), dict(config.worker.actor.model.override_config))
    elif not config.worker.actor.model.model_path:
        raise InputError("worker.actor.model.model_path: required (a model folder whose config.json is read), "
                         "or --shape 3b|7b")
    device = Device.detect(args.device_gb, config.trainer.n_gpus_per_node)
    plan = plan_memory(config, device, dims)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.table())
    plan.check()
    return 0


if __name__ == "__main__":
    run_cli(main, ConfigError, usage=__doc__)
