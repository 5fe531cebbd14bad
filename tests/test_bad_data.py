"""Bad data is one `error:` line (exit 2) naming the config key and the file, with nothing trained or left half-written;
a malformed JSON line is skipped as `bad_json` with its line number and the rest of the file loads.

The entry-point cases run the real `python -m RL.train_vlpo` (or RL.train_sft / RL.evaluate) in a subprocess on the tiny model:
data loads before Ray starts, so each takes seconds, not a training run.
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from RL.data.errors import DataError
from tests.helpers import assert_one_line

REPO = Path(__file__).resolve().parent.parent
TINY_CPU = REPO / "examples" / "config" / "vlpo_tiny_cpu.yaml"


def toy_rows(data_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(Path(data_dir, "train.jsonl"))]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def run_entry(module: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("LATENT_RL_DEBUG", None)  # a traceback on the console is what this must not see
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


# ------------------------------------------------------------------------ each case: (overrides, fragments)
def no_train_files(tmp: Path, data: str):
    return ["data.train_files="], ["data.train_files", ".jsonl", ".parquet"]


def missing_path(tmp: Path, data: str):
    return [f"data.train_files={tmp}/nowhere.jsonl"], ["data.train_files", f"{tmp}/nowhere.jsonl", ".parquet"]


def missing_val_path(tmp: Path, data: str):
    return [f"data.val_files={tmp}/held_out.jsonl"], ["data.val_files", f"{tmp}/held_out.jsonl"]


def folder_without_data(tmp: Path, data: str):
    (tmp / "notes").mkdir()
    (tmp / "notes" / "readme.txt").write_text("rows are elsewhere\n")
    return [f"data.train_files={tmp}/notes"], ["data.train_files", f"{tmp}/notes", ".json, .jsonl or .parquet"]


def every_image_missing(tmp: Path, data: str):
    rows = [{**row, "images": [f"gone/{row['id']}.png"]} for row in toy_rows(data)]
    path = write_jsonl(tmp / "rows.jsonl", rows)
    return [f"data.train_files={path}"], ["data.train_files", str(path), "no usable rows", "missing_image 32",
                                          "gone/toy-train-00000.png", "data.image_key=images"]


def image_key_of_integers(tmp: Path, data: str):
    rows = [{**row, "seen": number} for number, row in enumerate(toy_rows(data))]
    path = write_jsonl(tmp / "rows.jsonl", rows)
    return [f"data.train_files={path}", f"data.image_dir={data}", "data.image_key=seen"], [
        "data.train_files rows.jsonl", "'seen' (data.image_key)", "int64", "set data.image_key"]


def parquet_that_is_not(tmp: Path, data: str):
    (tmp / "rows.parquet").write_text(Path(data, "train.jsonl").read_text())
    return [f"data.train_files={tmp}/rows.parquet"], ["data.train_files", "rows.parquet", "not a parquet file"]


def json_scalar(tmp: Path, data: str):
    (tmp / "rows.json").write_text("42\n")
    return [f"data.train_files={tmp}/rows.json"], ["data.train_files", "rows.json line 1", "bad_json", "object"]


def missing_split(tmp: Path, data: str):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(toy_rows(data)[:4])}).save_to_disk(str(tmp / "saved"))
    return [f"data.train_files={tmp}/saved@test"], ["data.train_files", f"{tmp}/saved", "no split 'test'", "train"]


CASES = [no_train_files, missing_path, missing_val_path, folder_without_data, every_image_missing,
         image_key_of_integers, parquet_that_is_not, json_scalar, missing_split]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_vlpo_data_is_one_line_and_trains_nothing(case, tiny_model_dir, toy_data_dir, tmp_path):
    overrides, fragments = case(tmp_path, toy_data_dir)
    written = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    run_dir = tmp_path / "runs" / "bad_data"
    result = run_entry("RL.train_vlpo", [f"config={TINY_CPU}", f"worker.actor.model.model_path={tiny_model_dir}",
                                   f"data.train_files={toy_data_dir}/train.jsonl",
                                   f"data.val_files={toy_data_dir}/val.jsonl", f"trainer.save_dir={tmp_path}/runs",
                                   "trainer.experiment_name=bad_data", *overrides])
    assert_one_line(result, 2, *fragments)
    assert not run_dir.exists()  # refused before anything is written: no run folder, config.yaml or error log
    assert all(path.read_bytes() == content for path, content in written.items())  # the input is left as it was


def test_sft_with_no_usable_row_names_each_reason(tiny_model_dir, toy_data_dir, tmp_path):
    rows = [{**row, "images": ["gone.png"]} for row in toy_rows(toy_data_dir)[:3]] + ['{"problem": "cut off']
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    result = run_entry("RL.train_sft", [f"config={TINY_CPU}", f"worker.actor.model.model_path={tiny_model_dir}",
                                  f"data.train_files={path}", f"trainer.save_dir={tmp_path}/runs",
                                  f"sft.output_dir={tmp_path}/sft"])
    assert_one_line(result, 2, "data.train_files", "no usable rows for sft.stage=mirage2", str(path),
                   "bad_json 1 (e.g. sft.jsonl line 4", "missing_image 3")
    assert not (tmp_path / "sft").exists()


def test_eval_tsv_without_answers_names_the_column_and_leaves_no_converted_file(tiny_model_dir, tmp_path):
    tsv = tmp_path / "bench.tsv"
    tsv.write_text("index\tquestion\tA\tB\timage\n1\tWhich colour?\tred\tblue\t\n")
    result = run_entry("RL.evaluate", [tiny_model_dir, f"data.val_files={tsv}", f"config={TINY_CPU}",
                                       f"eval.save_dir={tmp_path}/eval", "name=bench"])
    assert_one_line(result, 2, str(tsv), "no answer column", "index, question, answer")
    inputs = tmp_path / "eval" / "bench" / "inputs"
    assert not inputs.exists() or not any(inputs.iterdir())  # neither a 0-byte nor a .partial conversion


# ------------------------------------------------------------------------ malformed JSON lines: skipped per row
@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from monet_models import load_processor

    return load_processor(tiny_model_dir)


def test_malformed_jsonl_lines_are_skipped_with_their_line_numbers(tmp_path, toy_data_dir, processor, caplog, capfd):
    from RL.data import RLPromptDataset

    lines = [json.dumps(row) for row in toy_rows(toy_data_dir)[:6]]
    lines[1] = lines[1][:40]  # cut off mid-row
    lines[4] = "[1, 2]"  # JSON, but not a row
    path = write_jsonl(tmp_path / "rows.jsonl", lines)
    with caplog.at_level(logging.WARNING):
        dataset = RLPromptDataset(str(path), processor, image_dir=toy_data_dir, min_pixels=3136, max_pixels=12544)
    assert len(dataset) == 4 and dataset.skipped == {"bad_json": 2}
    assert [dataset[i]["row_id"] for i in range(4)] == [f"toy-train-0000{n}" for n in (0, 2, 3, 5)]
    report = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert len(report) == 1 and "bad_json 2 (e.g. rows.jsonl line 2: not valid JSON" in report[0]
    assert "also rows.jsonl line 5" in report[0]
    assert "Failed to load JSON" not in capfd.readouterr().err  # the json reader's own complaint is not repeated


def test_a_json_list_that_does_not_parse_is_refused_at_its_line(tmp_path, toy_data_dir, processor):
    from RL.data import RLPromptDataset

    text = json.dumps(toy_rows(toy_data_dir)[:3], indent=1)
    path = tmp_path / "rows.json"
    path.write_text(text.replace('"answer"', "answer", 1))
    with pytest.raises(DataError, match=r"rows.json line \d+ column \d+ is not valid JSON"):
        RLPromptDataset(str(path), processor, image_dir=toy_data_dir)
