"""Training curves of a run, from its metrics.jsonl, and an evaluation's accuracies, as PNG files (no wandb or
tensorboard needed).

`plot_run` writes one PNG per metric and an overview grid into `runs/<run>/plots/`; metrics the run never logged are
skipped. The trainers call it when a run ends; `python -m tools.plot_metrics` calls it for any run folder.
`plot_evaluation` draws an evaluation's summary (accuracy per pass with its 95% interval, and per category) beside
its summary.md.
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
    ("sft_loss", "SFT losses", ("sft/loss", "sft/ce", "sft/align")),
    ("timing", "seconds per stage", ("timing_s/*",)),
)
SMOOTH_POINTS = 8  # below this many points the raw line is drawn alone
LINE_STYLES = ("-", "--", ":", "-.")  # after the palette's colours are used up


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


def line_styles(count: int) -> list[dict]:
    """A colour and line style per series, no two alike: tab10 up to 10 series, tab20 beyond, then the styles
    cycle (matplotlib's default cycle repeats its colours after 10, so a panel of 11 timings had two alike)."""
    palette = plt.get_cmap("tab10" if count <= 10 else "tab20").colors
    return [{"color": palette[index % len(palette)], "linestyle": LINE_STYLES[index // len(palette) % len(LINE_STYLES)]}
            for index in range(count)]


def draw(ax, rows: list[dict], title: str, keys: tuple[str, ...]) -> bool:
    """Draw the keys that have data onto `ax` (raw points faint, a smoothed line over them); False if none has."""
    present = [(key, series(rows, key)) for pattern in keys for key in matching_keys(rows, pattern)]
    present = [(key, steps, values) for key, (steps, values) in present if steps]
    for (key, steps, values), style in zip(present, line_styles(len(present))):
        if len(steps) >= SMOOTH_POINTS:
            ax.plot(steps, values, alpha=0.3, linewidth=1, color=style["color"])
            ax.plot(steps, smoothed(values), linewidth=2, label=key, **style)
        else:
            ax.plot(steps, values, marker="o", markersize=3, label=key, **style)
    drawn = len(present)
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


# ---- evaluation ------------------------------------------------------------------------------------------------
def plot_evaluation(summary: dict, path: str | Path) -> Path:
    """An evaluation's summary (RL/evaluate/stats.py) as one PNG: accuracy per pass with its 95% Wilson interval,
    and, when the rows carry categories, accuracy per category and pass beside it. Returns `path`."""
    passes = summary["passes"]
    names = list(passes)
    styles = dict(zip(names, line_styles(len(names))))
    split = [name for name in names if passes[name].get("per_category")]  # the passes whose rows carry categories
    categories = sorted({category for name in split for category in passes[name]["per_category"]})
    widths = [max(4.0, len(names) + 2.0)] + ([max(5.0, 0.6 * len(categories) * len(split) + 1)] if split else [])
    fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths), 4), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    _accuracy_bars(axes[0][0], [[passes[name]] for name in names], names, styles, groups=None)
    axes[0][0].set_title("accuracy per pass (95% CI)", fontsize=10)
    if split:
        cells = [[passes[name]["per_category"].get(category) for category in categories] for name in split]
        _accuracy_bars(axes[0][1], cells, split, styles, groups=categories)
        axes[0][1].set_title("accuracy per category (95% CI)", fontsize=10)
        axes[0][1].legend(fontsize=7, ncol=len(split), loc="upper center")
    fig.suptitle(f"{Path(str(summary.get('model') or '')).name}: {_data_name(summary.get('data'))}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _accuracy_bars(ax, cells: list[list], names: list[str], styles: dict, groups: list[str] | None) -> None:
    """Bars of accuracy with asymmetric interval whiskers, one bar per pass in each group (`groups` None: one group,
    the passes named on the axis). `cells[pass][group]` is a stats dict, or None where the pass has no item of that
    group; nothing judged is "n/a" on the axis."""
    width = 0.8 / len(names)
    for index, (name, row) in enumerate(zip(names, cells)):
        label, style = name, styles[name]
        for group, stats in enumerate(row):
            x = group + (index - (len(names) - 1) / 2) * width
            value = stats.get("accuracy") if stats else None
            if value is None or not math.isfinite(value):
                ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            low, high = stats["ci95"]
            ax.bar(x, value, width * 0.9, color=style["color"], label=label, yerr=[[value - low], [high - value]],
                   capsize=3, error_kw={"linewidth": 1})
            label = None  # one legend entry per pass
    if groups is None:
        ax.set_xticks([(index - (len(names) - 1) / 2) * width for index in range(len(names))], names, fontsize=8,
                      rotation=30 if len(names) > 3 else 0)
    else:
        ax.set_xticks(range(len(groups)), groups, fontsize=8, rotation=30 if len(groups) > 4 else 0)
    ax.set_ylim(0, 1.15)  # room for the legend above a bar at 1.0
    ax.set_ylabel("accuracy")
    ax.grid(axis="y", alpha=0.3)


def _data_name(data) -> str:
    files = data if isinstance(data, list) else [data]
    return ", ".join(Path(str(item)).name for item in files if item) or "data"
