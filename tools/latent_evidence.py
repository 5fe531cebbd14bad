"""The evidence table of `examples/latent_evidence.sh`: does the latent block carry what the answer needs?

    python -m tools.latent_evidence EVIDENCE_DIR
    python -m tools.latent_evidence --gain RUN_DIR     (the end message of `examples/vlpo_train.sh`'s embedded run)

reads, for every seed folder `EVIDENCE_DIR/seed<S>/`, the evaluation summaries `eval/<arm>/summary.json`
(`python -m RL.evaluate`, Wilson intervals and paired deltas included) and the RL runs' `rl/<arm>/metrics.jsonl`, and
writes `EVIDENCE_DIR/evidence.md` (the tables), `val_accuracy.png` (validation accuracy per step of the RL arms) and
`ablations.png` (accuracy per ablation pass of the latent models). A seed without its own SFT arms (SHARE_SFT=1)
is compared with the first seed's. Seeds are pooled by summing correct and judged
answers (one Wilson interval over all of them): the seeds share the held-out questions, so the pooled interval is
a summary of the runs, not of more questions.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from RL.evaluate.stats import wilson  # noqa: E402
from RL.plots import series  # noqa: E402
from RL.tracking import read_metrics  # noqa: E402

# (folder name, what the arm is); the SFT arms first, then the RL arms (which also have runs under rl/)
SFT_ARMS = (("text_sft", "text-only SFT (no latent block, same rows and steps)"),
            ("stage3", "Monet stage 3 (latent SFT)"))
RL_ARMS = (("vlpo_noise", "VLPO, latent noise on (from stage 3)"),
           ("vlpo_noise0", "VLPO, latent noise 0 (from stage 3)"),
           ("grpo_text", "text-only GRPO (from text-only SFT)"))
ABLATED = ("stage3", "vlpo_noise")
PASSES = ("direct", "zero", "shuffle", "noise", "text")  # summary.json names them direct, ablate_<name>


def pass_key(name: str) -> str:
    return name if name == "direct" else f"ablate_{name}"


def load(root: Path) -> dict:
    """{seed: {arm: summary}} for every summary found."""
    found = {}
    for seed_dir in sorted(root.glob("seed*")):
        arms = {path.parent.name: json.loads(path.read_text()) for path in sorted(seed_dir.glob("eval/*/summary.json"))}
        if arms:
            found[seed_dir.name] = arms
    return found


def pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def cell(correct: int, judged: int) -> str:
    if not judged:
        return "—"
    low, high = wilson(correct, judged)
    return f"{pct(correct / judged)} [{pct(low)}, {pct(high)}]"


def pooled(runs: dict, arm: str, pass_name: str = "direct") -> tuple[int, int]:
    stats = [arms[arm]["passes"].get(pass_name) for arms in runs.values() if arm in arms]
    stats = [s for s in stats if s]
    return sum(s["correct"] for s in stats), sum(s["judged"] for s in stats)


def start_accuracy(root: Path, seed: str, arm: str) -> float | None:
    """val/accuracy at the RL run's first validation (its starting model)."""
    steps, values = series(read_metrics(root / seed / "rl" / arm), "val/accuracy") if \
        (root / seed / "rl" / arm / "metrics.jsonl").exists() else ([], [])
    return values[0] if steps else None


def arms_table(root: Path, runs: dict) -> list[str]:
    seeds = list(runs)
    lines = ["| arm | " + " | ".join(f"{seed} accuracy [95% CI]" for seed in seeds) + " | pooled [95% CI] |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for arm, title in SFT_ARMS + RL_ARMS:
        cells = []
        for seed in seeds:
            stats = runs[seed].get(arm, {}).get("passes", {}).get("direct")
            cells.append(cell(stats["correct"], stats["judged"]) if stats else "—")
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {cell(*pooled(runs, arm))} |")
    return lines


def gains_table(root: Path, runs: dict) -> list[str]:
    """Held-out accuracy of each RL arm minus that of the model it started from (both evaluated greedily)."""
    start = {"vlpo_noise": "stage3", "vlpo_noise0": "stage3", "grpo_text": "text_sft"}
    lines = ["| RL arm | " + " | ".join(f"{seed} gain (points)" for seed in runs) + " | pooled gain |",
             "|---|" + "---|" * (len(runs) + 1)]
    for arm, title in RL_ARMS:
        cells = []
        shared = next((arms[start[arm]] for arms in runs.values() if start[arm] in arms), {})  # SHARE_SFT=1
        for seed, arms in runs.items():
            a = arms.get(arm, {}).get("passes", {}).get("direct")
            b = arms.get(start[arm], shared).get("passes", {}).get("direct")
            cells.append(f"{100 * (a['accuracy'] - b['accuracy']):+.1f}" if a and b else "—")
        (ca, na), (cb, nb) = pooled(runs, arm), pooled(runs, start[arm])  # a shared start counts once
        total = f"{100 * (ca / na - cb / nb):+.1f}" if na and nb else "—"
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {total} |")
    return lines


def ablation_table(runs: dict) -> list[str]:
    lines = ["| model | seed | " + " | ".join(PASSES) + " |", "|---|---|" + "---|" * len(PASSES)]
    for arm in ABLATED:
        title = dict(SFT_ARMS + RL_ARMS)[arm]
        for seed, arms in runs.items():
            passes = arms.get(arm, {}).get("passes", {})
            if not passes:  # a seed that shares the first seed's SFT models (SHARE_SFT=1)
                continue
            cells = []
            for name in PASSES:
                stats = passes.get(pass_key(name))
                if not stats:
                    cells.append("—")
                    continue
                text = cell(stats["correct"], stats["judged"])
                d = stats.get("delta_vs_direct")
                if d:
                    text += f"; Δ {100 * d['delta']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"
                cells.append(text)
            lines.append(f"| {title} | {seed} | " + " | ".join(cells) + " |")
    return lines


def plot_val_accuracy(root: Path, runs: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = ("-", "--", ":", "-.")
    for color, (arm, title) in zip(("C0", "C1", "C2"), RL_ARMS):
        for style, seed in zip(styles, runs):
            metrics = root / seed / "rl" / arm
            if not (metrics / "metrics.jsonl").exists():
                continue
            steps, values = series(read_metrics(metrics), "val/accuracy")
            ax.plot(steps, values, style, color=color, marker="o", markersize=3, label=f"{title}, {seed}")
    ax.set_xlabel("RL step")
    ax.set_ylabel("val/accuracy (the RL runs' validation)")
    ax.set_title("validation accuracy per step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ablations(runs: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.8 / len(ABLATED)
    for offset, arm in enumerate(ABLATED):
        values, errors = [], [[], []]
        for name in PASSES:
            correct, judged = pooled(runs, arm, pass_key(name))
            value = correct / judged if judged else 0.0
            low, high = wilson(correct, judged) if judged else (0.0, 0.0)
            values.append(100 * value)
            errors[0].append(100 * (value - low))
            errors[1].append(100 * (high - value))
        xs = [index + (offset - (len(ABLATED) - 1) / 2) * width for index in range(len(PASSES))]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=dict(SFT_ARMS + RL_ARMS)[arm])
    ax.set_xticks(range(len(PASSES)), PASSES)
    ax.set_ylabel("held-out accuracy (%), seeds pooled, 95% Wilson")
    ax.set_title("what the answers owe to the latents")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_evidence(root: str | Path) -> Path:
    """Write evidence.md and the two plots under `root`; returns the markdown's path."""
    root = Path(root)
    runs = load(root)
    if not runs:
        raise FileNotFoundError(f"no {root}/seed*/eval/*/summary.json: run examples/latent_evidence.sh first")
    items = next(iter(next(iter(runs.values())).values()))["passes"]["direct"]["items"]
    text = [f"Held-out questions: {items} per seed; accuracy in % with 95% Wilson intervals; Δ: paired difference "
            "to the direct pass with Newcombe's 95% interval, in points.", "", "**Arms** (greedy, direct pass)", "",
            *arms_table(root, runs), "", "**RL gain** over the model each RL arm started from", "",
            *gains_table(root, runs), "", "**Latent ablations**", "", *ablation_table(runs), ""]
    out = root / "evidence.md"
    out.write_text("\n".join(text))
    plot_val_accuracy(root, runs, root / "val_accuracy.png")
    plot_ablations(runs, root / "ablations.png")
    return out


def gain_message(run_dir: str | Path) -> str:
    """What an RL run did to held-out accuracy: its first and last `val/accuracy`, and where the evidence is."""
    steps, values = series(read_metrics(run_dir), "val/accuracy") if (Path(run_dir) / "metrics.jsonl").exists() \
        else ([], [])
    pointer = ("what the latent block carries, with ablations and a text-only baseline: bash "
               "examples/latent_evidence.sh (docs/evaluation.md section 6)")
    if len(steps) < 2:
        return f"VLPO gain: {run_dir} has fewer than two validations; {pointer}"
    return (f"VLPO gain: held-out val/accuracy {values[0]:.3f} at step {steps[0]} -> {values[-1]:.3f} at step "
            f"{steps[-1]} ({100 * (values[-1] - values[0]):+.1f} points); {pointer}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the evidence folder (seed*/eval/<arm>/summary.json, seed*/rl/<arm>/)")
    parser.add_argument("--gain", action="store_true", help="ROOT is an RL run folder: print its val/accuracy gain")
    args = parser.parse_args()
    if args.gain:
        print(gain_message(args.root))
        return
    path = write_evidence(args.root)
    print(path.read_text())
    print(f"tables: {path}; plots: {path.parent / 'val_accuracy.png'}, {path.parent / 'ablations.png'}")


if __name__ == "__main__":
    main()
