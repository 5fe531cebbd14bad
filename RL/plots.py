"""Training curves of a run, from its metrics.jsonl, as PNG files (no wandb or tensorboard needed).

`plot_run` writes one PNG per metric and an overview grid into `runs/<run>/plots/`; metrics the run never logged are
skipped. The trainers call it when a run ends; `python -m tools.plot_metrics` calls it for any run folder.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from RL.tracking import read_metrics  # noqa: E402

# (file stem, title, metric keys drawn together; a key ending in "*" takes every key with that prefix)
PANELS = (
    ("reward_mean", "reward/mean", ("reward/mean",)),
    ("accuracy", "accuracy", ("reward/accuracy", "val/accuracy")),
    ("pg_loss", "actor loss", ("actor/pg_loss", "solver/pg_loss", "proposer/pg_loss")),
    ("kl_loss", "KL to the reference", ("actor/kl_loss", "solver/kl_loss", "proposer/kl_loss")),
    ("kl_coef", "KL coefficient", ("actor/kl_coef", "solver/kl_coef", "proposer/kl_coef")),
    ("grad_norm", "gradient norm", ("actor/grad_norm", "solver/grad_norm", "proposer/grad_norm")),
    ("response_length", "response length (tokens)", ("rollout/response_length", "solver/response_length",
                                                     "proposer/question_length")),
    ("latent_blocks", "latent blocks per response", ("rollout/latent_blocks", "solver/latent_blocks")),
    ("self_consistency", "solver self-consistency", ("solver/self_consistency", "val/majority_accuracy")),
    ("proposer", "proposer reward and answer entropy", ("proposer/reward", "solver/answer_entropy")),
    ("timing", "seconds per stage", ("timing_s/*",)),
)
SMOOTH_POINTS = 8  # below this many points the raw line is drawn alone


def matching_keys(rows: list[dict], pattern: str) -> list[str]:
    if not pattern.endswith("*"):
        return [pattern]
    prefix = pattern[:-1]
    return sorted({key for row in rows for key in row if key.startswith(prefix)})


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, last value per step winning (a resumed run may repeat a step)."""
    by_step = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and "step" in row:
            by_step[int(row["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def smoothed(values: list[float]) -> list[float]:
    """Exponential moving average with a window of about a tenth of the run (as TensorBoard's slider does)."""
    alpha = min(1.0, 2.0 / (max(len(values) / 10, 1.0) + 1.0))
    out, level = [], values[0]
    for value in values:
        level = alpha * value + (1 - alpha) * level
        out.append(level)
    return out


def draw(ax, rows: list[dict], title: str, keys: tuple[str, ...]) -> bool:
    """Draw the keys that have data onto `ax` (raw points faint, a smoothed line over them); False if none has."""
    drawn = 0
    for key in (name for pattern in keys for name in matching_keys(rows, pattern)):
        steps, values = series(rows, key)
        if not steps:
            continue
        if len(steps) >= SMOOTH_POINTS:
            line, = ax.plot(steps, values, alpha=0.3, linewidth=1)
            ax.plot(steps, smoothed(values), color=line.get_color(), linewidth=2, label=key)
        else:
            ax.plot(steps, values, marker="o", markersize=3, label=key)
        drawn += 1
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if drawn > 1 or (drawn and len(keys) > 1):
        ax.legend(fontsize=7)
    return bool(drawn)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs of `run_dir` and return their paths (overview last)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} is missing or empty")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written, present = [], []
    for stem, title, keys in PANELS:
        fig, ax = plt.subplots(figsize=(6, 4))
        if draw(ax, rows, title, keys):
            path = out / f"{stem}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            written.append(path)
            present.append((title, keys))
        plt.close(fig)
    if present:
        written.append(_overview(rows, present, out / "overview.png", run_dir.name))
    return written


def _overview(rows, panels, path: Path, title: str) -> Path:
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.5 * nrows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels):
        draw(ax, rows, name, keys)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
