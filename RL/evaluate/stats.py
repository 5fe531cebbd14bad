"""Accuracy with intervals, paired differences between passes, cost, and the summary table.

Intervals are 95%: Wilson's score interval for one accuracy (sane at 0, 1 and small n, where the normal
approximation is not), Newcombe's hybrid score interval (his method 10) for the difference of two accuracies measured
on the same items, which uses the pairing instead of treating the passes as independent samples. Items without a
verdict (the API judge gave none) are left out of both: they are never counted wrong.
"""
from __future__ import annotations

import math
from collections import defaultdict

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # The interval holds p exactly (at p = 0 or 1, rounding could leave the bound a hair past it).
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def paired_difference(base: list[int], other: list[int], z: float = Z95) -> tuple[float, float, float]:
    """(acc(other) - acc(base), low, high) over the same items, 0/1 outcomes (Newcombe 1998, method 10)."""
    n = len(base)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    both = sum(1 for a, b in zip(base, other) if a and b)
    only_other = sum(1 for a, b in zip(base, other) if b and not a)
    only_base = sum(1 for a, b in zip(base, other) if a and not b)
    neither = n - both - only_other - only_base
    p1, p2 = (both + only_other) / n, (both + only_base) / n
    l1, u1 = wilson(both + only_other, n, z)
    l2, u2 = wilson(both + only_base, n, z)
    denominator = (both + only_other) * (neither + only_base) * (both + only_base) * (neither + only_other)
    phi = (both * neither - only_other * only_base) / math.sqrt(denominator) if denominator else 0.0
    diff = p1 - p2
    low = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return (diff, low, high)


def accuracy(rows: list[dict]) -> dict:
    judged = [row for row in rows if row["verdict"] is not None]
    correct = sum(1 for row in judged if row["verdict"] > 0)
    low, high = wilson(correct, len(judged))
    return {"items": len(rows), "judged": len(judged), "correct": correct, "no_verdict": len(rows) - len(judged),
            "accuracy": correct / len(judged) if judged else math.nan, "ci95": [low, high]}


def pass_summary(rows: list[dict]) -> dict:
    """Accuracy, per category when rows carry one, answer size and cost per item."""
    summary = accuracy(rows)
    categories = defaultdict(list)
    for row in rows:
        if row.get("category") is not None:
            categories[str(row["category"])].append(row)
    if categories:
        summary["per_category"] = {name: accuracy(group) for name, group in sorted(categories.items())}
    n, seconds = max(len(rows), 1), sum(row["seconds"] for row in rows)
    tokens = sum(row["tokens"] for row in rows)
    summary.update(
        tokens_per_answer=sum(row["answer_tokens"] for row in rows) / n,
        blocks_per_answer=sum(row["blocks"] for row in rows) / n,
        cost_per_item={"forwards": sum(row["forwards"] for row in rows) / n, "seconds": seconds / n,
                       "tokens": tokens / n},
        throughput={"items_per_s": len(rows) / seconds if seconds else math.nan,
                    "tokens_per_s": tokens / seconds if seconds else math.nan},
    )
    return summary


def delta(base_rows: list[dict], rows: list[dict]) -> dict:
    """Accuracy of `rows` minus `base_rows` on the items both judged, with Newcombe's paired interval."""
    base = {row["index"]: row["verdict"] for row in base_rows if row["verdict"] is not None}
    pairs = [(int(base[row["index"]] > 0), int(row["verdict"] > 0)) for row in rows
             if row["verdict"] is not None and row["index"] in base]
    diff, low, high = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
    return {"items": len(pairs), "delta": diff, "ci95": [low, high]}


def markdown(summary: dict) -> str:
    """The summary as Markdown tables: passes, then per-category accuracy, then RMM's loop metrics."""
    passes = summary["passes"]
    lines = ["| pass | items | accuracy | 95% CI | Δ vs direct [95% CI] | no verdict | tokens/answer | blocks/answer "
             "| forwards/item | s/item | tokens/item | items/s |", "|" + "---|" * 12]
    for name, stats in passes.items():
        d = stats.get("delta_vs_direct")
        shift = f"{_pct(d['delta'], signed=True)} [{_pct(d['ci95'][0], True)}, {_pct(d['ci95'][1], True)}]" if d \
            else "—"
        cost = stats["cost_per_item"]
        lines.append(f"| {name} | {stats['items']} | {_pct(stats['accuracy'])} | [{_pct(stats['ci95'][0])}, "
                     f"{_pct(stats['ci95'][1])}] | {shift} | {stats['no_verdict']} | {stats['tokens_per_answer']:.1f} "
                     f"| {stats['blocks_per_answer']:.2f} | {cost['forwards']:.1f} | {cost['seconds']:.3f} | "
                     f"{cost['tokens']:.1f} | {stats['throughput']['items_per_s']:.2f} |")
    lines += _category_table(passes)
    for name, stats in passes.items():
        if "rmm" in stats:
            lines += ["", f"{name} loop: " + ", ".join(f"{key.replace('_', ' ')} {_pct(value)}"
                                                       for key, value in stats["rmm"].items())]
    return "\n".join(lines) + "\n"


def _category_table(passes: dict) -> list[str]:
    """Accuracy [95% CI] per category (rows) and pass (columns), for the passes that have categories."""
    names = [name for name, stats in passes.items() if "per_category" in stats]
    if not names:
        return []
    categories = sorted({cat for name in names for cat in passes[name]["per_category"]})
    lines = ["", "| category | items | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for cat in categories:
        cells = [passes[name]["per_category"].get(cat) for name in names]
        items = next(cell["items"] for cell in cells if cell)
        text = [f"{_pct(c['accuracy'])} [{_pct(c['ci95'][0])}, {_pct(c['ci95'][1])}]" if c else "—" for c in cells]
        lines.append(f"| {cat} | {items} | " + " | ".join(text) + " |")
    return lines


def _pct(value: float, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:+.1f}%" if signed else f"{100 * value:.1f}%"
