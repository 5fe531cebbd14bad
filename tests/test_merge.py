"""Offline merge: a DCP checkpoint (full weights or LoRA) becomes a Hugging Face folder with the same logits."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from monet_models.transformers import load_latent_model
from tests.helpers import coloured_image, encode_prompts
from RL.model_export import MergeError, merge_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LM_ATTENTION = r".*model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


def perturbed_model(model_dir, seed=1):
    """The tiny model with every weight moved, so a merge that silently kept the original weights would fail."""
    model, processor = load_latent_model(model_dir, dtype="fp32")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model.eval(), processor


def write_checkpoint(step_dir: Path, model, processor, role="actor", peft_config=None, save_ok=True):
    """The layout the policy workers write: <role>/model (DCP), <role>/huggingface, SAVE_OK."""
    role_dir = step_dir / role
    dcp.save({key: value.detach().clone() for key, value in model.state_dict().items()},
             checkpoint_id=str(role_dir / "model"))
    base = model.get_base_model() if peft_config is not None else model
    hf_dir = role_dir / "huggingface"
    base.config.save_pretrained(hf_dir)
    base.generation_config.save_pretrained(hf_dir)
    processor.save_pretrained(hf_dir)
    if peft_config is not None:
        peft_config.save_pretrained(str(hf_dir))
    if save_ok:
        (step_dir / "SAVE_OK").write_text("ok\n")
    return step_dir


def logits(model, processor):
    enc = encode_prompts(processor, ["what colour is this?", "count the squares"],
                         [coloured_image(), coloured_image((20, 200, 40))])
    with torch.no_grad():
        return model(**enc).logits


def load_merged(folder):
    import monet_models.processor  # noqa: F401  (registers the image-only processor for AutoProcessor)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)


def test_full_weights_merge_via_script_is_exact(tiny_model_dir, tmp_path):
    """merge_model.sh with paths relative to the folder it is run from, under umask 022: the merged folder lands
    there, every file readable as the umask leaves it (safetensors alone writes 0600), and its logits are exact."""
    model, processor = perturbed_model(tiny_model_dir)
    step_dir = write_checkpoint(tmp_path / "step_000050", model, processor)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = ROOT / "examples" / "merge_model.sh"
    result = subprocess.run(["bash", "-c", f"umask 022 && exec bash {script} step_000050 --out merged"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "merged").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    merged, merged_processor = load_merged(tmp_path / "merged")
    assert type(merged).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert torch.equal(logits(merged, merged_processor), logits(model, processor))
    assert not (tmp_path / "merged.partial").exists()


def test_lora_merge_matches_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, processor = load_latent_model(tiny_model_dir, dtype="fp32")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LM_ATTENTION, lora_dropout=0.0)
    peft_model = get_peft_model(base, config)
    wrapped = [name for name, _ in peft_model.named_modules() if name.endswith("lora_A")]
    assert wrapped and all(".language_model." in name for name in wrapped)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # lora_B starts at zero: move it so the adapter changes the logits
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    peft_model.eval()
    step_dir = write_checkpoint(tmp_path / "step_000010", peft_model, processor,
                                peft_config=peft_model.peft_config["default"])
    assert (step_dir / "actor" / "huggingface" / "adapter_config.json").is_file()

    out = merge_checkpoint(step_dir)
    merged, merged_processor = load_merged(out)
    assert not any("lora" in key for key in merged.state_dict())
    expected = logits(peft_model, processor)
    with peft_model.disable_adapter():
        base_logits = logits(peft_model, processor)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter matters
    assert (logits(merged, merged_processor) - expected).abs().max() <= 1e-5


def test_other_role_name(tiny_model_dir, tmp_path):
    model, processor = perturbed_model(tiny_model_dir, seed=5)
    step_dir = write_checkpoint(tmp_path / "step_000002", model, processor, role="solver")
    out = merge_checkpoint(step_dir, role="solver", out_dir=tmp_path / "solver_hf")
    merged, merged_processor = load_merged(out)
    assert torch.equal(logits(merged, merged_processor), logits(model, processor))
    with pytest.raises(MergeError, match="roles in this checkpoint: \\['solver'\\]"):
        merge_checkpoint(step_dir, role="actor")


def test_refuses_incomplete_checkpoint(tiny_model_dir, tmp_path):
    model, processor = perturbed_model(tiny_model_dir)
    step_dir = write_checkpoint(tmp_path / "step_000003.tmp", model, processor, save_ok=False)
    with pytest.raises(MergeError, match="no SAVE_OK"):
        merge_checkpoint(step_dir)
    assert not (step_dir / "huggingface").exists()


def test_wrong_keys_are_listed(tiny_model_dir, tmp_path):
    model, processor = perturbed_model(tiny_model_dir)
    step_dir = write_checkpoint(tmp_path / "step_000004", model, processor)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    state["model.extra.weight"] = state.pop("model.visual.merger.mlp.0.weight")
    shutil.rmtree(step_dir / "actor" / "model")
    dcp.save(state, checkpoint_id=str(step_dir / "actor" / "model"))
    with pytest.raises(MergeError) as error:
        merge_checkpoint(step_dir)
    assert "model.visual.merger.mlp.0.weight" in str(error.value) and "model.extra.weight" in str(error.value)


@pytest.mark.parametrize("dropped", [None, "lm_head.weight", "model.language_model.embed_tokens.weight"])
def test_tied_embeddings_either_name(tiny_model_dir, tmp_path, dropped):
    """With tied embeddings a checkpoint may hold both names or only one; the merge ties them either way."""
    from transformers import AutoModelForImageTextToText

    base, processor = load_latent_model(tiny_model_dir, dtype="fp32")
    config = base.config
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(7)
    model = AutoModelForImageTextToText.from_config(config).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    step_dir = write_checkpoint(tmp_path / "step_000001", model, processor)
    if dropped is not None:
        state = {key: value for key, value in model.state_dict().items() if key != dropped}
        shutil.rmtree(step_dir / "actor" / "model")
        dcp.save(state, checkpoint_id=str(step_dir / "actor" / "model"))
    merged, merged_processor = load_merged(merge_checkpoint(step_dir))
    assert merged.lm_head.weight is merged.get_input_embeddings().weight
    assert torch.equal(logits(merged, merged_processor), logits(model, processor))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
