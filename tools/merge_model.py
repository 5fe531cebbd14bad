"""Turn a training checkpoint into a plain Hugging Face model folder (LoRA merged), offline and in one process.

    python -m tools.merge_model RUN_STEP_DIR [--role actor] [--out DIR] [--dtype auto|fp32|bf16|fp16] [--adapter-only]

Reads `RUN_STEP_DIR/<role>/model` (torch.distributed.checkpoint, any world size) and `RUN_STEP_DIR/<role>/huggingface`
(config, generation config, processor, adapter_config.json with LoRA, the run's latent_config.json), and writes
`RUN_STEP_DIR/huggingface/` (`huggingface_<role>/` for roles other than actor), loadable with
`AutoModelForImageTextToText` / `AutoProcessor` (after `import monet_models.processor`) or by vLLM. The run's settings
(latent_config.json, its prompt template, generation_config.json) travel with the weights, so the merged folder
evaluates and generates as the run did without its training config (monet_models/run_settings.py). A LoRA role's
checkpoint holds only its adapter: the base comes from the adapter_config.json's base model path. `--adapter-only`
writes that adapter as a PEFT folder instead (`adapter_<role>/`, loadable with `PeftModel.from_pretrained(base,
folder)`).
"""
from __future__ import annotations

import argparse
import json
import time

from common.cli import ArgumentParser, run_cli
from RL.model_export import merge_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m tools.merge_model", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step_dir", help="a checkpoint folder such as runs/<run>/step_000050")
    parser.add_argument("--role", default="actor", help="actor (default), solver, proposer ...")
    parser.add_argument("--out", default=None, help="output folder (default STEP_DIR/huggingface)")
    parser.add_argument("--dtype", default="auto", help="auto (config.json's dtype), fp32, bf16 or fp16")
    parser.add_argument("--adapter-only", action="store_true",
                        help="write the role's LoRA adapter as a PEFT folder instead of a merged model")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = merge_checkpoint(args.step_dir, args.role, args.out, args.dtype, args.adapter_only)
    files = sorted(path.name for path in out.iterdir())
    print(json.dumps({"merged": str(out), "seconds": round(time.perf_counter() - start, 2), "files": files}))


if __name__ == "__main__":
    run_cli(main)
