"""Evaluation inputs: the project's data files as they are; DMLR's JSON list and VLMEvalKit's TSV are converted to
project rows (question, answer, images, id, every other column kept) so that one loader, `RLPromptDataset`, reads
them all with the same validation, image decoding and prompt template as training.

- DMLR: a JSON list of `{"prompt", "solution", "image_path", "idx"?}`; relative image paths resolve against
  `data.image_dir`, else the JSON file's folder.
- VLMEvalKit: a TSV with `index`, `question`, `answer`, `image` (base64, a JSON list of them, or the `index` of the
  row holding the same image), option columns `A`, `B`, ... rendered into the question, optional `hint`, `category`.

A file that cannot be converted (a TSV without an `answer` column, a DMLR row without its keys) is a `DataError`
naming the file and what is missing, and leaves no converted file behind: rows are written to a `.partial` name that
is renamed only when the whole file is written.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Iterator

from common.atomic import atomic_open
from RL.data.errors import DataError
from RL.data.fields import shorten
from RL.data.sources import as_path_list

OPTION_LETTERS = "ABCDEFGHIJ"
DMLR_KEYS = ("prompt", "solution", "image_path")
TSV_COLUMNS = ("index", "question", "answer")


def prepare_files(files, folder: Path, data) -> list[str]:
    """The data files to load: project files unchanged, converted copies (under `folder/inputs/`) of the others."""
    prepared = []
    for name in as_path_list(files):
        path = Path(name)
        kind = detect_format(path)
        if kind == "vlmevalkit" and not path.is_file():
            raise DataError(f"data.val_files: no such file: {path}")
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
                try:
                    rows = json.loads(path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):  # the project loader names what is wrong
                    return "project"
                if rows and isinstance(rows[0], dict) and all(key in rows[0] for key in DMLR_KEYS):
                    return "dmlr"
    return "project"


def write_rows(rows: Iterator[dict], path: Path, data) -> Path:
    """Rows with the configured column names (`data.prompt_key`, `answer_key`, `image_key`), as jsonl; `path`
    appears only complete (a refused row or a crash leaves neither it nor its `.partial`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"question": data.prompt_key, "answer": data.answer_key, "images": data.image_key}
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(json.dumps({names.get(key, key): value for key, value in row.items()}) + "\n")
    return path


def dmlr_rows(path: Path, image_dir) -> Iterator[dict]:
    for number, row in enumerate(json.loads(path.read_text())):
        missing = [key for key in DMLR_KEYS if not isinstance(row, dict) or key not in row]
        if missing:
            raise DataError(f"{path} row {number}: DMLR rows need {', '.join(DMLR_KEYS)}; missing "
                            f"{', '.join(missing)}")
        image = Path(row["image_path"])
        image = image if image.is_absolute() else Path(image_dir) / image
        extra = {key: value for key, value in row.items() if key not in (*DMLR_KEYS, "idx")}
        yield {"id": str(row.get("idx", f"{path.name}#{number}")), "question": row["prompt"],
               "answer": str(row["solution"]), "images": [str(image)],
               **extra}


def vlmevalkit_rows(path: Path) -> Iterator[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default field limit
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            rows, columns = list(reader), reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot read it as a UTF-8 TSV ({shorten(str(error), 120)})") from error
    missing = [key for key in TSV_COLUMNS if key not in columns]
    if missing:
        raise DataError(f"{path}: no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}; a VLMEvalKit TSV "
                        f"needs {', '.join(TSV_COLUMNS)} (evaluation judges against `answer`); its columns: "
                        f"{shorten(columns, 200)}")
    if not rows:
        raise DataError(f"{path}: a header and no rows; add the items to evaluate")
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
