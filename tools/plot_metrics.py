"""Training curves of a run, from its metrics.jsonl, or an evaluation's accuracies, as PNG files (no wandb or
tensorboard needed).

    python -m tools.plot_metrics runs/<run> [--out DIR]
    python -m tools.plot_metrics runs/eval/<name> [--out DIR]

A run folder: one PNG per metric and an overview grid into `runs/<run>/plots/` (RL/plots.py); metrics the run never
logged are skipped. An evaluation folder (one holding summary.json): `summary.png` beside it, accuracy per pass with
its 95% interval and per category (the evaluation draws it itself when it writes summary.md). The written paths are
printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from RL.plots import plot_evaluation, plot_run

EVAL_SUMMARY, EVAL_FIGURE = "summary.json", "summary.png"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.plot_metrics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="runs/<run_name>, or an evaluation's folder")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots; an evaluation: RUN_DIR)")
    args = parser.parse_args(argv)
    folder = Path(args.run_dir)
    try:
        if (folder / EVAL_SUMMARY).is_file() and not (folder / "metrics.jsonl").is_file():
            summary = json.loads((folder / EVAL_SUMMARY).read_text())
            out = Path(args.out) if args.out else folder
            out.mkdir(parents=True, exist_ok=True)
            paths = [plot_evaluation(summary, out / EVAL_FIGURE)]
        else:
            paths = plot_run(folder, args.out)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
