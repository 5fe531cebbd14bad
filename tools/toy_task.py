"""Write the bundled toy visual task (RL/toy_task.py): one coloured shape on a two-tone background, short-answer
questions about it, generated deterministically from a seed.

    python -m tools.toy_task --out examples/toy_data/generated --train 512 --val 64 [--sft]

With --sft it also writes the latent-SFT rows of the train split (`sft_monet.json`, `sft_mirage.jsonl`), whose
auxiliary image is a zoomed view of the shape's cell; with --selfplay-prompts the proposer–solver warm-start rows.
"""
from __future__ import annotations

import argparse

from RL.toy_task import make_toy_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--selfplay-prompts", nargs=2, metavar=("PROPOSER_JINJA", "SOLVER_JINJA"), default=None,
                        help="also write selfplay_sft.jsonl, prompted with these templates")
    parser.add_argument("--sft", action="store_true", help="also write sft_monet.json and sft_mirage.jsonl")
    args = parser.parse_args()
    print(make_toy_dataset(args.out, args.train, args.val, args.seed, args.selfplay_prompts, sft=args.sft))


if __name__ == "__main__":
    main()
