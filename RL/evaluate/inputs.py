"""Evaluation inputs: the project's data files as they are; DMLR's JSON list and VLMEvalKit's TSV are converted to
project rows (question, answer, images, id, every other column kept) so that one loader, `RLPromptDataset`, reads
them all with the same validation, image decoding and prompt template as training.

- DMLR: a JSON list of `{"prompt", "solution", "image_path", "idx"?}`; relative image paths resolve against
  `data.image_dir`, else the JSON file's folder.
- VLMEvalKit: a TSV with `index`, `question`, `answer`, `image` (base64, a JSON list of them, or the `index` of the
  row holding the same image), option columns `A`, `B`, ... rendered into the question, optional `hint`, `category`.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Iterator

from RL.data.sources import as_path_list

OPTION_LETTERS = "ABCDEFGHIJ"
DMLR_KEYS = ("prompt", "solution", "image_path")


def prepare_files(files, folder: Path, data) -> list[str]:
    """The data files to load: project files unchanged, converted copies (under `folder/inputs/`) of the others."""
    prepared = []
    for name in as_path_list(files):
        path = Path(name)
        kind = detect_format(path)
        if kind == "project":
            prepared.append(name)
            continue
        rows = vlmevalkit_rows(path) if kind == "vlmevalkit" else dmlr_rows(path, data.image_dir or path.parent)
        prepared.append(str(write_rows(rows, folder / "inputs" / f"{path.stem}.{kind}.jsonl", data)))
    return prepared


def detect_format(path: Path) -> str:
    """"vlmevalkit" (.tsv), "dmlr" (a .json list whose rows have prompt/solution/image_path) or "project"."""
    if path.suffix.lower() == ".tsv":
        return "vlmevalkit"
    if path.suffix.lower() == ".json" and path.is_file():
        with path.open("rb") as handle:
            if handle.read(64).lstrip()[:1] == b"[":
                rows = json.loads(path.read_text())
                if rows and isinstance(rows[0], dict) and all(key in rows[0] for key in DMLR_KEYS):
                    return "dmlr"
    return "project"


def write_rows(rows: Iterator[dict], path: Path, data) -> Path:
    """Rows with the configured column names (`data.prompt_key`, `answer_key`, `image_key`), as jsonl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"question": data.prompt_key, "answer": data.answer_key, "images": data.image_key}
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps({names.get(key, key): value for key, value in row.items()}) + "\n")
    return path


def dmlr_rows(path: Path, image_dir) -> Iterator[dict]:
    for number, row in enumerate(json.loads(path.read_text())):
        missing = [key for key in DMLR_KEYS if key not in row]
        if missing:
            raise ValueError(f"{path} row {number}: DMLR rows need {', '.join(DMLR_KEYS)}; missing {missing}")
        image = Path(row["image_path"])
        image = image if image.is_absolute() else Path(image_dir) / image
        extra = {key: value for key, value in row.items() if key not in (*DMLR_KEYS, "idx")}
        yield {"id": str(row.get("idx", f"{path.name}#{number}")), "question": row["prompt"],
               "answer": str(row["solution"]), "images": [str(image)],
               **extra}


def vlmevalkit_rows(path: Path) -> Iterator[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default field limit
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    missing = [key for key in ("index", "question", "answer") if rows and key not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: a VLMEvalKit TSV needs index, question and answer columns (missing {missing})")
    images = {row["index"]: row.get("image", "") for row in rows}
    for row in rows:
        options = {letter: row[letter] for letter in OPTION_LETTERS if (row.get(letter) or "").strip()}
        question = row["question"]
        if (row.get("hint") or "").strip():
            question = f"Hint: {row['hint']}\n{question}"
        if options:
            question += "\nOptions:\n" + "\n".join(f"{letter}. {text}" for letter, text in options.items())
        kept = {key: value for key, value in row.items()
                if key not in ("index", "question", "answer", "image", "image_path", "hint", *OPTION_LETTERS)}
        yield {"id": row["index"], "question": question, "answer": row["answer"],
               "images": _tsv_images(row, images), **({"options": options} if options else {}), **kept}


def _tsv_images(row: dict, images: dict) -> list[str]:
    value = (row.get("image") or "").strip()
    if not value and row.get("image_path"):
        return [row["image_path"]]
    if value.startswith("["):
        return list(json.loads(value))
    if len(value) < 64 and value in images:  # VLMEvalKit stores a repeated image once: the other row's index
        value = images[value]
    return [value] if value else []
