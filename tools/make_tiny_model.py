"""Build a tiny, randomly initialised Qwen2.5-VL fully offline (tokenizer, processor, model) in seconds.

    python -m tools.make_tiny_model --out DIR [--seed 0] [--shape tiny|3b|7b] [--layers N]

The tokenizer is trained on synthetic text and the toy task's (monet_models/tiny_model.py, RL/toy_task.py); token
ids differ from real Qwen checkpoints on purpose: code must look them up by string. `--shape 3b` / `7b` writes a
probe with every width of Qwen2.5-VL-3B / -7B (the full vocabulary; the tiny tokenizer fills its first rows) but only
`--layers` decoder layers and vision blocks (default 2), in bf16: what tools.bench_scale measures (docs/scale.md).
"""
from __future__ import annotations

import argparse
import time

from monet_models.tiny_model import SHAPES, build_tiny_model
from RL.toy_task import corpus_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=SHAPES, default="tiny",
                        help="tiny (the tests' model) or the widths of Qwen2.5-VL-3B / -7B")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers and vision blocks (default 2)")
    args = parser.parse_args()
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    start = time.perf_counter()
    path = build_tiny_model(args.out, corpus_lines(), args.seed, shape=args.shape, layers=args.layers)
    print(f"{args.shape} Qwen2.5-VL written to {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
