"""Data: load-time row checks, every image form and file kind, items, resumable order, image pool."""
import base64
import io
import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from monet_models.processor import load_processor
from RL.config import load_config
from RL.data import ImagePool, RLPromptDataset, StatefulPromptLoader, build_loader
from RL.data.errors import DataError
from RL.data.images import CorruptImageError, ImageTooLargeError, decode_image
from tests.thyme_data import FORMS, bomb_png, noisy_image, write_thyme_parquet

OPTIONS = dict(min_pixels=3136, max_pixels=12544, max_prompt_length=256)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


def png_bytes(size=(56, 56), colour=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 128).save(buffer, "PNG")
    return buffer.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def row(index: int, images, problem="<image>What colour is the shape?", **extra) -> dict:
    return {"id": f"r{index}", "problem": problem, "answer": "red", "images": images, **extra}


def toy_rows(toy_data_dir: str, count: int) -> list[dict]:
    lines = Path(toy_data_dir, "train.jsonl").read_text().splitlines()[:count]
    return [json.loads(line) for line in lines]


def image_token_count(ids: torch.Tensor, processor) -> int:
    return int((ids == processor.image_token_id).sum())


# ------------------------------------------------------------------------------------------------ bad rows
def test_bad_rows_are_skipped_counted_and_warned_once(tmp_path, toy_data_dir, processor, caplog):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes((200, 200))[:60])
    good = toy_rows(toy_data_dir, 4)
    bad = [
        row(1, ["images/does_not_exist.png"], id="bad-missing"),
        row(2, [str(corrupt)], id="bad-corrupt"),
        row(3, [str(truncated)], id="bad-truncated"),
        row(4, good[0]["images"], problem="<image><image>Two markers, one image?", id="bad-count"),
        row(5, good[0]["images"] * 2, problem="<image>One marker, two images", id="bad-count2"),
        {"id": "bad-key", "problem": "<image>Where is the answer?", "images": good[0]["images"]},
        row(6, good[0]["images"], problem="<image>" + "word " * 400, id="bad-long"),
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", good[:2] + bad + good[2:])
    with caplog.at_level(logging.WARNING, logger="RL.data.rl_dataset"):
        dataset = RLPromptDataset(str(path), processor, image_dir=toy_data_dir, **OPTIONS)
    assert len(dataset) == 4
    assert dataset.skipped == {"missing_key": 1, "image_count_mismatch": 2, "missing_image": 1,
                               "corrupt_image": 2, "overlong_prompt": 1}
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    for row_id in ("bad-missing", "bad-corrupt", "bad-truncated", "bad-count2", "bad-key", "bad-long"):
        assert row_id in message
    assert "image_count_mismatch 2 (e.g. bad-count: 2 markers, 1 images; also bad-count2)" in message
    assert "missing_key 1 (e.g. bad-key: answer)" in message
    assert [dataset[i]["row_id"] for i in range(4)] == [item["id"] for item in good]


# ------------------------------------------------------------------------------------------- Thyme-RL form
THYME = dict(prompt_key="question", answer_key="solution", **OPTIONS)
MONET_FORMAT = str(Path(__file__).resolve().parent.parent / "examples/format_prompt/monet_format.jinja")


@pytest.mark.parametrize("form", FORMS)
def test_thyme_parquet_loads_good_rows_and_names_each_bad_row(form, tmp_path, processor, caplog):
    thyme = write_thyme_parquet(tmp_path / "thyme.parquet", form)
    with caplog.at_level(logging.WARNING, logger="RL.data.rl_dataset"):
        dataset = RLPromptDataset(str(thyme.path), processor, image_key=thyme.image_key, format_prompt=MONET_FORMAT,
                                  **THYME)
    assert len(dataset) == thyme.good and dataset.markers_added == thyme.good
    assert dataset.skipped == {reason: 1 for reason in thyme.bad}
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2 and all(len(message) < 1500 for message in messages)  # no base64 in the log
    assert f"{thyme.good} rows had images but no <image> marker" in messages[0]
    for reason, index in thyme.bad.items():
        assert f"{reason} 1 (e.g. thyme.parquet#{index}: " in messages[1]
    item = dataset[1]
    assert item["question"].startswith("What colour") and item["ground_truth"] == "green"
    assert "<|vision_start|><|image_pad|><|vision_end|>What colour" in item["raw_prompt"]
    assert "put the final answer in \\boxed{}" in item["raw_prompt"]
    assert image_token_count(item["input_ids"], processor) == int(item["image_grid_thw"].prod()) // 4
    assert len(item["input_ids"]) == dataset.prompt_lengths[1]


def test_thyme_columns_are_named_when_the_keys_do_not_match(tmp_path, processor):
    thyme = write_thyme_parquet(tmp_path / "thyme.parquet", "base64", good=2, with_bad=False)
    with pytest.raises(DataError, match=r"no column 'problem' \(data.prompt_key\).*question"):
        RLPromptDataset(str(thyme.path), processor, **OPTIONS)
    with pytest.raises(DataError, match="set data.image_key=image"):
        RLPromptDataset(str(thyme.path), processor, **{**THYME, "image_key": "images"})


def test_long_strings_are_base64_never_paths_and_errors_stay_short(tmp_path, processor):
    jpeg = noisy_image("red", 0)
    wrapped = base64.encodebytes(jpeg).decode()  # MIME style: a newline every 76 characters
    assert decode_image(wrapped).size == (160, 160)
    assert decode_image(base64.urlsafe_b64encode(jpeg).decode()).size == (160, 160)
    assert decode_image("data:image/jpeg;base64," + base64.b64encode(jpeg).decode()).size == (160, 160)
    assert decode_image(base64.b64encode(jpeg)).size == (160, 160)  # base64 text in a binary column
    for garbage in ("/" + "A" * 300 + "!" * 200_000, "x" * 200_000, "data:image/png;base64," + "%" * 5000):
        with pytest.raises(CorruptImageError) as error:
            decode_image(garbage, tmp_path)
        assert len(str(error.value)) < 200
    rows = [{"question": "Colour?", "solution": "red", "image": "@" * 180_000},
            {"question": "Colour?", "solution": "red", "image": base64.b64encode(jpeg).decode()}]
    dataset = RLPromptDataset(str(write_jsonl(tmp_path / "rows.jsonl", rows)), processor, image_key="image", **THYME)
    assert len(dataset) == 1 and dataset.skipped == {"corrupt_image": 1}


def test_null_image_is_missing_and_blank_question_is_empty(tmp_path, toy_data_dir, processor):
    good = toy_rows(toy_data_dir, 2)
    rows = good + [dict(good[0], id="null-image", images=None, problem="What colour is the shape?"),
                   dict(good[0], id="blank", problem=" \n "),
                   dict(good[0], id="no-images", images=[], problem="A question without any image?")]
    dataset = RLPromptDataset(str(write_jsonl(tmp_path / "rows.jsonl", rows)), processor, image_dir=toy_data_dir,
                              **OPTIONS)
    assert dataset.skipped == {"missing_image": 1, "empty_prompt": 1}
    assert [dataset[i]["row_id"] for i in range(len(dataset))] == [good[0]["id"], good[1]["id"], "no-images"]
    assert dataset[2]["images"] == []  # an explicit empty list is a text-only prompt, null is a missing image


def test_image_pixel_cap_and_decompression_bomb(tmp_path, processor):
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb_png())
    with pytest.raises(ImageTooLargeError, match="cap 5000"):
        decode_image(png_bytes((100, 100)), max_pixels=5000)
    rows = [row(0, [png_bytes((100, 100))]), row(1, [png_bytes((60, 60))]), row(2, [bomb_png()])]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "sizes.parquet"))
    dataset = RLPromptDataset(str(tmp_path / "sizes.parquet"), processor, max_image_pixels=5000, **OPTIONS)
    assert len(dataset) == 1 and dataset.skipped == {"image_too_large": 2}


def test_non_utf8_lines_are_bad_encoding_and_good_rows_stay(tmp_path, toy_data_dir, processor, caplog):
    lines = [json.dumps(item).encode() for item in toy_rows(toy_data_dir, 3)]
    lines.insert(1, json.dumps(row(7, [], problem="Caf\u00e9?")).encode().replace(b"Caf\\u00e9", b"Caf\xe9"))
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="RL.data.rl_dataset"):
        dataset = RLPromptDataset(str(path), processor, image_dir=toy_data_dir, **OPTIONS)
    assert len(dataset) == 3 and dataset.skipped == {"bad_encoding": 1}
    assert "bad_encoding 1 (e.g. latin1.jsonl line 2: not UTF-8 (byte 0xe9 at column" in caplog.text
    array = tmp_path / "array.json"
    array.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")  # one row per line: still one line per bad row
    assert len(RLPromptDataset(str(array), processor, image_dir=toy_data_dir, **OPTIONS)) == 3
    array.write_bytes(b"[" + b", ".join(lines) + b"]")  # all on one line: nothing left to read
    with pytest.raises(DataError, match="array.json line 1: not UTF-8"):
        RLPromptDataset(str(array), processor, image_dir=toy_data_dir, **OPTIONS)


@pytest.mark.parametrize("name, content", [("empty.jsonl", b""), ("blank.jsonl", b"\n  \n"), ("empty.json", b""),
                                           ("empty.parquet", b""), ("no_rows.parquet", None)])
def test_empty_file_is_refused_by_name(name, content, tmp_path, processor):
    path = tmp_path / name
    if content is None:
        datasets.Dataset.from_dict({"problem": [], "answer": []}).to_parquet(str(path))
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=f"{name}: empty file"):
        RLPromptDataset(str(path), processor, **OPTIONS)


def test_overlong_kept_when_filter_off(tmp_path, toy_data_dir, processor):
    good = toy_rows(toy_data_dir, 1)[0]
    path = write_jsonl(tmp_path / "long.jsonl", [dict(good, problem="<image>" + "word " * 400)])
    dataset = RLPromptDataset(str(path), processor, filter_overlong_prompts=False,
                              **{**OPTIONS, "image_dir": toy_data_dir})
    assert len(dataset) == 1 and len(dataset[0]["input_ids"]) > OPTIONS["max_prompt_length"]


def test_no_usable_rows_is_an_error(tmp_path, processor):
    path = write_jsonl(tmp_path / "bad.jsonl", [row(0, ["missing.png"])])
    with pytest.raises(DataError, match="no usable rows"):
        RLPromptDataset(str(path), processor, **OPTIONS)


# ---------------------------------------------------------------------------------------------- image forms
def test_relative_paths_resolve_in_the_data_file_folder(toy_data_dir, processor):
    dataset = RLPromptDataset(str(Path(toy_data_dir, "train.jsonl")), processor, **OPTIONS)
    assert len(dataset) == 32 and dataset.skipped == {}
    item = dataset[0]
    assert item["ground_truth"] == toy_rows(toy_data_dir, 1)[0]["answer"]
    assert item["extra"]["kind"] in ("colour", "shape", "side")
    assert item["input_ids"].dim() == 1 and item["input_ids"].dtype == torch.long
    assert item["mm_token_type_ids"].shape == item["input_ids"].shape
    assert int(item["mm_token_type_ids"].sum()) == image_token_count(item["input_ids"], processor)
    assert item["raw_prompt"].endswith("<|im_start|>assistant\n")
    assert item["raw_prompt"].count("<|image_pad|>") == 1  # unexpanded, as vLLM wants it


def test_bytes_and_dict_images_from_parquet(tmp_path, processor):
    data = png_bytes()
    rows = [row(0, [data]), row(1, [{"bytes": data, "path": None}])]
    for index, item in enumerate(rows):
        datasets.Dataset.from_list([item]).to_parquet(str(tmp_path / f"part{index}.parquet"))
    dataset = RLPromptDataset([str(tmp_path / "part0.parquet"), str(tmp_path / "part1.parquet")], processor,
                              **OPTIONS)
    assert len(dataset) == 2 and dataset.skipped == {}
    assert all(dataset[i]["images"][0].size == (56, 56) for i in range(2))


def test_base64_images_with_and_without_data_prefix(tmp_path, processor):
    encoded = base64.b64encode(png_bytes()).decode()
    path = write_jsonl(tmp_path / "b64.jsonl", [row(0, [encoded]), row(1, ["data:image/png;base64," + encoded]),
                                                row(2, [base64.b64encode(b"x" * 90).decode()], id="bad-b64")])
    dataset = RLPromptDataset(str(path), processor, **OPTIONS)
    assert len(dataset) == 2 and dataset.skipped == {"corrupt_image": 1}


def test_pil_images_from_a_saved_datasets_folder(tmp_path, processor):
    features = datasets.Features({"id": datasets.Value("string"), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "images": datasets.List(datasets.Image())})
    rows = [row(0, [{"bytes": png_bytes(), "path": None}]),
            row(1, [{"bytes": b"garbage", "path": None}], id="bad-pil")]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    dataset = RLPromptDataset(str(tmp_path / "saved"), processor, **OPTIONS)
    assert len(dataset) == 1 and dataset.skipped == {"corrupt_image": 1}
    assert isinstance(dataset[0]["images"][0], Image.Image)


def test_images_fit_the_pixel_range_and_become_rgb(tmp_path, processor):
    rows = [row(0, [png_bytes((300, 200))]), row(1, [png_bytes((20, 20))]), row(2, [png_bytes(mode="L")])]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "sizes.parquet"))
    dataset = RLPromptDataset(str(tmp_path / "sizes.parquet"), processor, **OPTIONS)
    big, small, grey = (dataset[i]["images"][0] for i in range(3))
    assert big.width * big.height <= OPTIONS["max_pixels"] and abs(big.width / big.height - 1.5) < 0.05
    assert small.width * small.height >= OPTIONS["min_pixels"]
    assert grey.mode == "RGB"
    for index in range(3):
        item = dataset[index]
        assert len(item["input_ids"]) == dataset.prompt_lengths[index]  # the cheap length check is exact


# ------------------------------------------------------------------------------------------------ file kinds
def test_folder_input_reads_top_level_files_only(tmp_path, toy_data_dir, processor):
    folder = tmp_path / "data"
    (folder / "val").mkdir(parents=True)
    rows = toy_rows(toy_data_dir, 6)
    for item in rows:
        item["images"] = [str(Path(toy_data_dir, item["images"][0]))]
    write_jsonl(folder / "a.jsonl", rows[:3])
    datasets.Dataset.from_list(rows[3:5]).to_parquet(str(folder / "b.parquet"))
    write_jsonl(folder / "val" / "c.jsonl", rows[5:])
    (folder / "notes.txt").write_text("ignored")
    dataset = RLPromptDataset(str(folder), processor, **OPTIONS)
    assert sorted(dataset[i]["row_id"] for i in range(len(dataset))) == sorted(r["id"] for r in rows[:5])
    assert len(RLPromptDataset(str(folder / "val"), processor, **OPTIONS)) == 1


def test_json_array_file_and_format_prompt(tmp_path, toy_data_dir, processor):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(toy_rows(toy_data_dir, 2)))
    template = tmp_path / "format.jinja"
    template.write_text("Q: {{ content }} Think, then answer in \\boxed{}.")
    dataset = RLPromptDataset(str(path), processor, image_dir=toy_data_dir, format_prompt=str(template), **OPTIONS)
    assert "Q: <|vision_start|><|image_pad|><|vision_end|>" in dataset[0]["raw_prompt"]
    assert "answer in \\boxed{}" in dataset[0]["raw_prompt"]


def test_from_config_and_max_samples_do_not_drop_the_last_row(toy_data_dir, processor):
    train = str(Path(toy_data_dir, "train.jsonl"))
    base = [f"data.train_files={train}", "worker.actor.model.model_path=/m", "data.min_pixels=3136",
            "data.max_pixels=12544", "data.max_prompt_length=256"]
    config = load_config(base)
    assert len(RLPromptDataset.from_config(config.data, processor)) == 32  # -1 = every row
    config = load_config(base + ["data.train_max_samples=5"])
    dataset = RLPromptDataset.from_config(config.data, processor)
    assert [dataset[i]["row_id"] for i in range(5)] == [r["id"] for r in toy_rows(toy_data_dir, 5)]
    assert RLPromptDataset(train, processor, config.data).options.max_prompt_length == 256  # sft.py's call form


# -------------------------------------------------------------------------------------------------- items
def test_items_image_tokens_match_their_features(tmp_path, toy_data_dir, processor):
    rows = toy_rows(toy_data_dir, 3)
    rows[1]["problem"] = "<image>" + "Describe everything you see in great detail, please. " * 3
    rows.append(row(9, [], problem="A question without any image?"))
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    dataset = RLPromptDataset(str(path), processor, image_dir=toy_data_dir, **OPTIONS)
    items = [dataset[i] for i in range(len(dataset))]
    merge = processor.image_processor.merge_size
    for item in items:
        patches = int(item["image_grid_thw"].prod(-1).sum())
        assert image_token_count(item["input_ids"], processor) == patches // merge ** 2
        assert item["pixel_values"].shape[0] == patches
        assert int(item["mm_token_type_ids"].sum()) == patches // merge ** 2
    assert [len(item["image_grid_thw"]) for item in items] == [1, 1, 1, 0]
    assert items[3]["ground_truth"] == "red" and items[3]["images"] == []


# ------------------------------------------------------------------------------------------------ loader
def row_ids(batch) -> list[str]:
    return [item["row_id"] for item in batch]


def test_loader_order_is_seeded_and_covers_each_epoch(toy_data_dir, processor):
    dataset = RLPromptDataset(str(Path(toy_data_dir, "train.jsonl")), processor, **OPTIONS)
    loader = StatefulPromptLoader(dataset, 8, seed=3)
    first = [row_ids(batch) for batch in loader]
    assert len(first) == 4 and len({i for batch in first for i in batch}) == 32
    second = [row_ids(batch) for batch in loader]
    assert second != first and loader.epoch == 2
    again = StatefulPromptLoader(dataset, 8, seed=3)
    assert [row_ids(batch) for batch in again] == first
    assert [row_ids(batch) for batch in StatefulPromptLoader(dataset, 8, seed=4)] != first


def test_loader_resume_continues_the_same_order(toy_data_dir, processor):
    dataset = RLPromptDataset(str(Path(toy_data_dir, "train.jsonl")), processor, **OPTIONS)
    loader = StatefulPromptLoader(dataset, 8, seed=1)
    for _ in range(6):  # into the second epoch
        loader.next_batch()
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    expected = [row_ids(loader.next_batch()) for _ in range(4)]
    resumed = StatefulPromptLoader(dataset, 8, seed=1, num_workers=1)  # prefetching must not shift the order
    resumed.load_state_dict(state)
    assert [row_ids(resumed.next_batch()) for _ in range(4)] == expected
    with pytest.raises(DataError, match="seed"):
        StatefulPromptLoader(dataset, 8, seed=2).load_state_dict(state)


def test_val_loader_keeps_everything(toy_data_dir, processor):
    config = load_config([f"data.train_files={Path(toy_data_dir, 'train.jsonl')}", "worker.actor.model.model_path=/m",
                          "data.rollout_batch_size=16", "data.val_batch_size=5"])
    dataset = RLPromptDataset(str(Path(toy_data_dir, "val.jsonl")), processor, **OPTIONS)
    val = build_loader(dataset, config.data, split="val")
    sizes = [len(batch) for batch in val]
    assert sizes == [5, 3]  # in order, nothing dropped
    with pytest.raises(DataError, match="rollout_batch_size"):
        build_loader(dataset, config.data, split="train")  # 8 prompts cannot fill a batch of 16


# -------------------------------------------------------------------------------------------- image pool
@pytest.fixture()
def pool_dir(tmp_path):
    root = tmp_path / "pool"
    for folder in ("a", "b/deep", ".hidden", "c"):
        (root / folder).mkdir(parents=True)
    for index, name in enumerate(["a/1.png", "a/2.JPG", "b/deep/3.jpeg", "b/4.webp", "c/5.bmp", "6.tiff"]):
        image = Image.new("RGB", (30 + index, 30), (index * 40, 0, 0))
        image.save(root / name, format={"JPG": "JPEG", "JPEG": "JPEG"}.get(name.rsplit(".", 1)[1].upper(),
                                                                            name.rsplit(".", 1)[1].upper()))
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "7.png")
    Image.new("RGB", (8, 8)).save(root / "a" / ".8.png")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "c" / "broken.png").write_bytes(b"broken")
    return root


def test_image_pool_scan_and_determinism(pool_dir):
    pool = ImagePool(pool_dir, seed=7)
    names = sorted(Path(path).name for path in map(str, pool.files))
    assert names == ["1.png", "2.JPG", "3.jpeg", "4.webp", "5.bmp", "6.tiff", "broken.png"]
    order = [pool.order[i] for i in range(len(pool))]
    assert [ImagePool(pool_dir, seed=7).order[i] for i in range(len(pool))] == order
    assert ImagePool(pool_dir, seed=8).order != order or len(pool) < 2
    first = pool.sample(1)
    assert first.image.mode == "RGB" and Path(first.path).is_absolute()
    assert pool.sample(0).path == first.path  # steps start at 1; 0 is treated as 1
    wraps = pool.sample(1 + len(pool))
    assert wraps.path == first.path or Path(first.path).name == "broken.png"


def test_image_pool_skips_corrupt_file_and_counts_it(pool_dir):
    pool = ImagePool(pool_dir, seed=7)
    broken = next(p for p, f in enumerate(pool.order) if pool.files[f].name == "broken.png")
    entry = pool.sample(broken + 1)
    following = pool.files[pool.order[(broken + 1) % len(pool)]]
    assert entry.path == str(following) and pool.num_corrupt == 1
    pool.sample(broken + 1)
    assert pool.num_corrupt == 1


def test_image_pool_subfolder_filter_and_errors(pool_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="RL.data.image_pool"):
        pool = ImagePool(pool_dir, include_subfolders="b, missing", seed=0)
    assert sorted(path.name for path in pool.files) == ["3.jpeg", "4.webp"]
    assert "missing" in caplog.text
    assert {pool.sample(t).subfolder for t in (1, 2)} == {"b"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImagePool(tmp_path / "empty")
    with pytest.raises(DataError, match="data.image_dir: the image pool folder .*nowhere does not exist"):
        ImagePool(tmp_path / "nowhere")
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of the 1 image files"):
        ImagePool(only_broken).sample(1)


def test_image_pool_resizes_into_pixel_range(pool_dir):
    pool = ImagePool(pool_dir, include_subfolders="a", min_pixels=3136, max_pixels=12544)
    image = pool.sample(1).image
    assert 3136 <= image.width * image.height <= 12544
