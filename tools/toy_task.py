"""Write a bundled toy visual task, generated deterministically from a seed:
- `--task shapes` (RL/toy_task.py): one coloured shape on a two-tone background, short-answer questions about it;
- `--task pointer` (RL/toy_pointer_task.py): a 2x2 grid, an arrow in one cell, "What colour is the cell the arrow
  points to?", a two-hop question whose Monet rows zoom into the arrow's target (the intermediate evidence).

    python -m tools.toy_task --out examples/toy_data/generated --train 512 --val 64 [--task shapes|pointer] [--sft]

With --sft it also writes the latent-SFT rows of the train split (`sft_monet.json`, `sft_mirage.jsonl`), whose
auxiliary image is a zoomed view of the shape's (or the arrow's target) cell, and for the pointer task the text-only
rows `sft_text.json`; with --selfplay-prompts the proposer–solver warm-start rows.
"""
from __future__ import annotations

import argparse

from RL.toy_pointer_task import make_pointer_dataset
from RL.toy_task import make_toy_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", choices=("shapes", "pointer"), default="shapes")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--selfplay-prompts", nargs=2, metavar=("PROPOSER_JINJA", "SOLVER_JINJA"), default=None,
                        help="also write selfplay_sft.jsonl, prompted with these templates")
    parser.add_argument("--sft", action="store_true", help="also write sft_monet.json and sft_mirage.jsonl")
    args = parser.parse_args()
    make = make_pointer_dataset if args.task == "pointer" else make_toy_dataset
    print(make(args.out, args.train, args.val, args.seed, args.selfplay_prompts, sft=args.sft))


if __name__ == "__main__":
    main()
