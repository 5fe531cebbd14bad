"""The toy_latent task's functions for lmms-eval, and the rows it reads.

lmms-eval runs in its own environment (examples/lmms_eval_endpoint.sh), which never imports this project: the
answers are graded with a copy of rewards/answer.py (`rule_answer.py`, put beside this file by the script), so the
rule is the one the project's rule judge applies to word answers (`rewards/accuracy.py`: the extracted answer, the
text after the last "is" or the last \\boxed{}, latent blocks stripped, normalised, equal to the ground truth; the
math-equivalence fallback is left out, the toy answers are words).

    python utils.py ROWS_IN ROWS_OUT   # the project's rows (problem, answer, images relative to ROWS_IN) -> the task's
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from pathlib import Path

IMAGE_MARKER = "<image>"
LATENT_BLOCK = re.compile(r"<latent×\d+>")


@functools.cache
def rule_answer():
    """rewards/answer.py's copy beside this file, loaded by path (no project import)."""
    spec = importlib.util.spec_from_file_location("rule_answer", Path(__file__).with_name("rule_answer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doc_to_visual(doc: dict) -> list:
    from PIL import Image

    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question without its `<image>` marker: lmms-eval's chat model class puts the image first, as the project's
    rows do (the marker leads every toy question)."""
    return doc["problem"].replace(IMAGE_MARKER, "").strip()


def process_results(doc: dict, results: list[str]) -> dict:
    response, rule = results[0] or "", rule_answer()
    answer = rule.normalize_text(rule.extract_answer(response))
    correct = bool(answer) and answer == rule.normalize_text(str(doc["answer"]))
    return {"exact_match": float(correct), "latent_rate": float(bool(LATENT_BLOCK.search(response)))}


def write_rows(source: Path, target: Path) -> int:
    """The rows with absolute image paths (lmms-eval reads them from anywhere); returns how many."""
    count = 0
    with open(source) as rows, open(target, "w") as out:
        for line in rows:
            if not line.strip():
                continue
            row = json.loads(line)
            if IMAGE_MARKER not in row["problem"] or not row.get("images"):
                raise ValueError(f"{source}: row {row.get('id', count)} has no image; the task is image questions")
            row["images"] = [str((source.parent / path).resolve()) for path in row["images"]]
            row.pop("facts", None)  # nested dicts the json builder would type per file: not needed
            out.write(json.dumps(row) + "\n")
            count += 1
    return count


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(write_rows(Path(sys.argv[1]), Path(sys.argv[2])))
