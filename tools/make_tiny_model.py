"""Build a tiny, randomly initialised Qwen2.5-VL fully offline (tokenizer, processor, model) in seconds.

    python -m tools.make_tiny_model --out DIR [--seed 0]

The tokenizer is trained on synthetic text and the toy task's (monet_models/tiny_model.py, RL/toy_task.py); token
ids differ from real Qwen checkpoints on purpose: code must look them up by string.
"""
from __future__ import annotations

import argparse
import time

from monet_models.tiny_model import build_tiny_model
from RL.toy_task import corpus_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    path = build_tiny_model(args.out, corpus_lines(), args.seed)
    print(f"tiny Qwen2.5-VL written to {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
