"""Latent-SFT rows: the three formats load, bad rows are skipped and counted, labels and hidden spans are laid out
as each stage trains on them, and SFT config mistakes are refused by key before anything heavy is imported."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from RL.config import ConfigError, load_config
from RL.data.errors import DataError
from RL.data.sft_dataset import SFTDataset, sft_dataset
from RL.train_sft import sft_run_config
from monet_models import load_processor

REPO = Path(__file__).resolve().parent.parent
K = 3


def config_for(stage, model_dir, files, **extra):
    values = {"sft.stage": stage, "data.train_files": files, "sft.latent_size": K, "sft.observation_weight": 3.0,
              "sft.freeze_vision_tower": True, "trainer.n_gpus_per_node": 1, **extra}
    return sft_run_config(load_config([f"config={REPO}/examples/config/sft_tiny_cpu.yaml",
                                       f"worker.actor.model.model_path={model_dir}"]
                                      + [f"{key}={value}" for key, value in values.items()]))


def test_monet_row_layouts_labels_and_hidden_span(tiny_model_dir, sft_data_dir):
    processor = load_processor(tiny_model_dir)
    tok = processor.tokenizer
    dataset = sft_dataset(config_for("monet2", tiny_model_dir, f"{sft_data_dir}/sft_monet.json"), processor, K)
    item = dataset[0]
    ids, weight = item["input_ids"].tolist(), item["ce_weight"].tolist()
    names = tok.convert_ids_to_tokens(ids)
    response = len(ids) - 1 - ids[::-1].index(tok.convert_tokens_to_ids("<|im_start|>")) + 3  # after "assistant\n"
    assert all(w == 0 for w in weight[:response])  # the prompt
    start, end = names.index("<abs_vis_token>"), names.index("</abs_vis_token>")
    assert weight[start] == 1 and end - start == K + 1 and all(weight[i] == 0 for i in range(start + 1, end + 1))
    observed = tok.encode("a", add_special_tokens=False)[0]  # the observation "a <colour> <shape> on the <side>"
    opened = end + 1
    assert ids[opened] == observed and "<observation>" not in names and "</observation>" not in names  # spans only
    closed = opened + int(item["obs"].sum())
    assert all(weight[i] == 3.0 for i in range(opened, closed)) and weight[closed] == 1  # "The answer is ..."
    assert item["obs"][opened:closed].all() and weight[-1] == 1 and ids[-1] == tok.eos_token_id
    image = [i for i in range(response, len(ids)) if names[i] == "<|image_pad|>"]
    assert image and all(weight[i] == 0 and item["hidden"][i] == 1 == item["view"][i] for i in image)
    assert all(item["view"][i] == 1 and item["hidden"][i] == 0 for i in range(start + 1, end))
    assert item["view"][start] == item["view"][end] == 0 and item["hidden"].sum() == len(image)
    teacher = tok.convert_ids_to_tokens(item["teacher_input_ids"].tolist())
    assert "<abs_vis_token>" not in teacher and item["teacher_obs"].sum() == item["obs"].sum()
    assert item["pixel_values"].shape[0] == item["teacher_pixel_values"].shape[0]  # question image + the zoom


def test_rows_of_three_formats_and_the_stage_they_train(tiny_model_dir, sft_data_dir):
    processor = load_processor(tiny_model_dir)
    mirage = sft_dataset(config_for("mirage1", tiny_model_dir, f"{sft_data_dir}/sft_mirage.jsonl"), processor, K)
    item = mirage[0]
    assert item["helper_image_grid_thw"].shape == (1, 3) and (item["input_ids"] == mirage.tokens.pad).sum() == K
    rl = sft_dataset(config_for("mirage2", tiny_model_dir, f"{sft_data_dir}/train.jsonl"), processor, K)
    text = processor.tokenizer.decode(rl[0]["input_ids"])
    assert "\\boxed{" in text and (rl[0]["input_ids"] == rl.tokens.start).sum() == 1
    monet3 = sft_dataset(config_for("monet3", tiny_model_dir, f"{sft_data_dir}/sft_monet.json"), processor, K)
    assert (monet3[0]["input_ids"] == processor.image_token_id).sum() == 4  # the zoom is gone, the question stays
    with pytest.raises(DataError, match="sft.stage=monet1: .* holds rl rows"):
        sft_dataset(config_for("monet1", tiny_model_dir, f"{sft_data_dir}/train.jsonl"), processor, K)


def test_bad_rows_are_skipped_and_counted(tiny_model_dir, sft_data_dir, tmp_path):
    rows = json.loads(Path(sft_data_dir, "sft_monet.json").read_text())[:4]
    for row in rows:  # absolute paths: the file moves
        for turn in row["data"]:
            for content in turn["content"]:
                if content["type"] == "image":
                    content["image"] = str(Path(sft_data_dir, content["image"]))
    rows[1]["data"][0]["content"][0]["image"] = "/no/such.png"  # the question image
    rows[2]["data"][1]["content"][0]["text"] *= 2  # two placeholders, one auxiliary image
    rows[3]["data"][0]["content"][1]["text"] = "   "  # no question
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    processor = load_processor(tiny_model_dir)
    config = config_for("monet1", tiny_model_dir, str(path))
    dataset = SFTDataset(str(path), processor, config.data, config.sft, K)
    assert len(dataset) == 1
    assert dataset.skipped == {"empty_prompt": 1, "aux_image_mismatch": 1, "missing_image": 1}
    short = config_for("monet1", tiny_model_dir, str(path), **{"sft.max_length": 20})
    with pytest.raises(DataError, match="no usable rows"):
        SFTDataset(str(path), processor, short.data, short.sft, K)


@pytest.mark.parametrize("args, fragment", [
    (["sft.batch_size=3", "trainer.n_gpus_per_node=2"], "sft.batch_size, trainer.n_gpus_per_node"),
    (["sft.align_layers=middle"], "sft.align_layers"),
    (["sft.stage=mirage1", "sft.freeze_vision_tower=false"], "sft.stage, sft.freeze_vision_tower"),
    (["sft.stage=monet4"], "sft.stage: 'monet4' is not one of"),
    (["sft.lr=-1"], "sft.lr"),
    (["sft.train_files=rows.json"], "sft.train_files: unknown key .*did you mean data.train_files"),  # removed keys
    (["sft.experiment_name=x"], "sft.experiment_name: unknown key .*did you mean trainer.experiment_name"),
])
def test_sft_config_mistakes_name_the_key(args, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_config(args, require_inputs=False)


def test_entry_point_refuses_monet3_without_its_teacher_before_heavy_imports(tmp_path):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "RL.train_sft", "sft.stage=monet3",
                             "worker.actor.model.model_path=/some/model", "data.train_files=rows.json",
                             f"trainer.save_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert result.returncode == 2 and len(lines) == 1 and "sft.teacher_path" in lines[0]
    assert not imported & {"torch", "transformers", "ray"}
