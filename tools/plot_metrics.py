"""Training curves of a run, from its metrics.jsonl, as PNG files (no wandb or tensorboard needed).

    python -m tools.plot_metrics runs/<run> [--out DIR]

Writes one PNG per metric and an overview grid into `runs/<run>/plots/` (RL/plots.py); metrics the run never logged
are skipped with a note; the written paths are printed.
"""
from __future__ import annotations

import argparse
import sys

from RL.plots import plot_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="runs/<run_name>")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
