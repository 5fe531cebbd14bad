"""The memory planner (RL/memory_plan.py): parameter counts against transformers' own model, the resident state
against a hand computation, refusals that name the keys to change, and the real-width probe's config."""
import json
import subprocess
import sys

import pytest
import torch

from RL.config import load_config
from RL.memory_plan import GIB, Device, MemoryPlanError, ModelDims, plan_memory
from RL.preflight import check_memory

# Qwen2.5-VL-7B-Instruct's parameter count (its model card: 8.29 B), reproduced by transformers on the meta device.
PARAMS_7B = 8_292_166_656


def released(shape: str, layers=None) -> ModelDims:
    from monet_models.tiny_model import released_config

    return ModelDims.from_config(released_config(shape, layers))


def config(*overrides):
    return load_config(list(overrides), require_inputs=False)


def component(plan, phase: str, name: str):
    return next(c for c in next(p for p in plan.phases if p.name == phase).components if c.name == name)


@pytest.mark.parametrize("shape,layers", [("3b", None), ("7b", None), ("7b", 2)])
def test_parameter_counts_match_transformers(shape, layers):
    """Every count the plan is built on equals the model transformers builds from the same config (meta device)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from monet_models.tiny_model import released_config

    raw = released_config(shape, layers)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=raw["text_config"], vision_config=raw["vision_config"],
            tie_word_embeddings=raw["tie_word_embeddings"]))
    dims = ModelDims.from_config(raw)
    assert dims.total == sum(p.numel() for p in model.parameters())
    assert dims.largest_tensor == max(p.numel() for p in model.parameters())
    layer = model.model.language_model.layers[0]
    assert dims.decoder_layer == sum(p.numel() for p in layer.parameters())
    assert dims.vision_block == sum(p.numel() for p in model.model.visual.blocks[0].parameters())
    if shape == "7b" and layers is None:
        assert dims.total == PARAMS_7B


def test_config_layouts_agree():
    """A released checkpoint's config.json keeps text fields at the top; transformers 5 writes them in text_config."""
    nested = {"tie_word_embeddings": False, "vision_config": {"depth": 4},
              "text_config": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}}
    flat = {**nested["text_config"], "tie_word_embeddings": False, "vision_config": {"depth": 4}}
    assert ModelDims.from_config(nested) == ModelDims.from_config(flat)
    assert ModelDims.from_config(flat, {"text_config": {"num_hidden_layers": 5}}).layers == 5


def test_resident_state_matches_hand_computation():
    """7B over 8 ranks: fp32 master weights, gradients and AdamW's two fp32 moments (4 + 4 + 8 bytes a parameter);
    adamw_bf16 keeps bf16 weights and gradients, the same fp32 moments and a bf16 Kahan buffer (2 + 2 + 10)."""
    dims, device = released("7b"), Device("cuda", 80 * GIB, "test")
    common = ("trainer.n_gpus_per_node=8", "worker.actor.offload.offload_params=false",
              "worker.actor.offload.offload_optimizer=false", "worker.ref.offload.offload_params=false")
    plan = plan_memory(config(*common, "worker.actor.optim.strategy=adamw"), device, dims)
    assert component(plan, "update", "weights").device == PARAMS_7B * 4 // 8
    assert component(plan, "update", "gradients").device == PARAMS_7B * 4 // 8
    assert component(plan, "update", "optimizer").device == PARAMS_7B * 8 // 8
    assert component(plan, "update", "reference").device == PARAMS_7B * 2 // 8  # worker.ref.fsdp.torch_dtype bf16
    bf16 = plan_memory(config(*common, "worker.actor.optim.strategy=adamw_bf16"), device, dims)
    assert component(bf16, "update", "weights").device == PARAMS_7B * 2 // 8
    assert component(bf16, "update", "gradients").device == PARAMS_7B * 2 // 8
    assert component(bf16, "update", "optimizer").device == PARAMS_7B * 10 // 8
    # 16 nodes: the same state over 128 shards
    wide = plan_memory(config(*common, "trainer.nnodes=16", "sft.batch_size=128", "worker.actor.optim.strategy=adamw"),
                       device, dims)
    assert component(wide, "update", "optimizer").device == PARAMS_7B * 8 // 128


def test_offload_moves_state_to_host_and_engine_sleeps_there():
    dims, device = released("7b"), Device("cuda", 80 * GIB, "test")
    plan = plan_memory(config("trainer.n_gpus_per_node=8", "worker.actor.offload.offload_params=true",
                              "worker.rollout.name=vllm"), device, dims)
    weights = component(plan, "update", "weights")
    assert weights.device == 0 and weights.host == PARAMS_7B * 4 // 8
    asleep = component(plan, "update", "engine weights")
    assert asleep.device == 0 and asleep.host == PARAMS_7B * 2  # vLLM sleep level 1: bf16 weights on the host
    rollout = next(p for p in plan.phases if p.name == "rollout")
    engine = sum(c.device for c in rollout.components if c.name in ("engine weights", "KV cache", "engine activations"))
    assert engine == int(0.6 * 80 * GIB)  # vLLM takes gpu_memory_utilization x the device, whatever it holds


def test_refuses_a_plan_that_cannot_fit_and_names_the_keys():
    dims = released("7b")
    cfg = config("trainer.n_gpus_per_node=8", "worker.actor.offload.offload_params=false",
                 "worker.actor.offload.offload_optimizer=false", "worker.actor.model.enable_gradient_checkpointing=false")
    plan = plan_memory(cfg, Device("cuda", 40 * GIB, "a 40 GiB test device"), dims)
    with pytest.raises(MemoryPlanError) as refused:
        plan.check()
    message = str(refused.value)
    assert "update phase" in message and "40.0 GiB of a 40 GiB test device" in message
    assert "worker.actor.model.enable_gradient_checkpointing" in message  # activations are the largest part
    # the same run on 141 GiB devices, with checkpointing, offload and room for vLLM, fits
    roomy = config("trainer.n_gpus_per_node=8", "worker.rollout.gpu_memory_utilization=0.6")
    plan_memory(roomy, Device("cuda", 141 * GIB, "test"), dims).check()


def test_refuses_a_vllm_budget_without_room_for_one_sequence():
    cfg = config("trainer.n_gpus_per_node=8", "worker.rollout.name=vllm", "worker.rollout.gpu_memory_utilization=0.2")
    with pytest.raises(MemoryPlanError, match="worker.rollout.gpu_memory_utilization"):
        plan_memory(cfg, Device("cuda", 80 * GIB, "test"), released("7b")).check()


def test_preflight_refuses_with_the_capacity_key(tiny_model_dir):
    """At start-up: a device too small for even the tiny model's run is refused before Ray starts, as an InputError
    naming the phase; -1 turns the check off."""
    small = config(f"worker.actor.model.model_path={tiny_model_dir}", "trainer.n_gpus_per_node=2",
                   "trainer.device_memory_gb=0.5")
    with pytest.raises(MemoryPlanError, match=r"trainer.device_memory_gb=0.5"):
        check_memory(small)
    check_memory(config(f"worker.actor.model.model_path={tiny_model_dir}", "trainer.device_memory_gb=-1"))


def test_plan_memory_command_prints_json_and_exits_2_when_refused(tmp_path):
    """The command's JSON holds every phase with its components; a refusal is one `error:` line, status 2."""
    command = [sys.executable, "-m", "tools.plan_memory", "config=examples/config/vlpo_monet.yaml", "--shape", "7b"]
    out = subprocess.run(command + ["--device-gb", "141", "--json"], capture_output=True, text=True, check=True)
    plan = json.loads(out.stdout)
    assert list(plan["phases"]) == ["load", "rollout", "scoring", "update", "sync"]
    assert plan["fits"] and plan["model"]["parameters"] == PARAMS_7B
    refused = subprocess.run(command + ["--device-gb", "24"], capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("error: memory plan:") and len(refused.stderr.strip().splitlines()) == 1


def test_probe_config_has_the_released_widths():
    """--shape 3b/7b: every width of the released model, only the depth chosen (config only: building 3B-wide
    weights takes gigabytes)."""
    from monet_models.tiny_model import build_config, build_tokenizer

    tokenizer = build_tokenizer(0, ["a small corpus"])
    for shape, hidden, heads, kv, inter, vocab, tied in (("3b", 2048, 16, 2, 11008, 151936, True),
                                                          ("7b", 3584, 28, 4, 18944, 152064, False)):
        cfg = build_config(tokenizer, shape, layers=2)
        text, vision = cfg.text_config, cfg.vision_config
        assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.intermediate_size,
                text.vocab_size, text.num_hidden_layers) == (hidden, heads, kv, inter, vocab, 2)
        assert (vision.hidden_size, vision.num_heads, vision.intermediate_size, vision.out_hidden_size,
                vision.depth) == (1280, 16, 3420, hidden, 2)
        assert cfg.tie_word_embeddings == tied and len(tokenizer) < vocab
        assert vision.fullatt_block_indexes == [1]  # the probe keeps one full-attention block
    tiny = build_config(tokenizer)
    assert (tiny.text_config.hidden_size, tiny.text_config.num_hidden_layers) == (128, 2)


def test_a_gae_run_plans_the_critic_beside_the_actor():
    """With algorithm.adv_estimator=gae the critic (value model) lives on every device: its fp32 shards (the 7B
    backbone and a hidden + 1 value head) and AdamW's two moments for everything but the frozen untied lm_head stay
    resident in every phase; its own update is a moment of the update phase, whose activations are the actor's for
    the same tokens and settings. A critic that cannot fit is refused naming a worker.critic.* key."""
    dims, device = released("7b"), Device("cuda", 141 * GIB, "test")
    common = ("trainer.n_gpus_per_node=8", "worker.actor.offload.offload_params=false",
              "worker.actor.offload.offload_optimizer=false", "worker.ref.offload.offload_params=false",
              "worker.rollout.name=vllm", "worker.rollout.gpu_memory_utilization=0.3")
    grpo = plan_memory(config(*common), device, dims)
    gae = plan_memory(config(*common, "algorithm.adv_estimator=gae"), device, dims)
    critic_params = PARAMS_7B + 3584 + 1
    trainable = critic_params - 152064 * 3584  # the untied lm_head: no gradient, no optimizer state
    resident = critic_params * 4 // 8 + trainable * 8 // 8
    phases = {phase.name: phase.device for phase in grpo.phases}
    for phase in gae.phases:  # load: rank 0's host copies of a checkpoint remain its peak
        if phase.name in ("rollout", "scoring", "sync", "update"):
            assert phase.device - phases[phase.name] == resident, phase.name
    assert component(gae, "update", "critic optimizer").device == trainable * 8 // 8
    # the critic's update as the larger moment: no checkpointing, the actor's micro-batch and compute dtype
    frozen = (*common, "worker.actor.model.freeze_vision_tower=true", "worker.critic.model.freeze_vision_tower=true")
    heavy = plan_memory(config(*frozen, "algorithm.adv_estimator=gae",
                               "worker.critic.model.enable_gradient_checkpointing=false"), device, dims)
    actor_alone = component(plan_memory(config(*frozen), device, dims), "update", "activations (no checkpointing)")
    assert component(heavy, "update", "critic activations").device == actor_alone.device
    assert component(heavy, "update", "critic gradients").device == (trainable - dims.vision) * 4 // 8  # frozen
    assert not component(heavy, "update", "actor update (another moment)").counted
    with pytest.raises(MemoryPlanError, match="update phase.*worker.critic.model.enable_gradient_checkpointing"):
        plan_memory(config(*common, "algorithm.adv_estimator=gae",
                           "worker.critic.model.enable_gradient_checkpointing=false"),
                    Device("cuda", 80 * GIB, "an 80 GiB test device"), dims).check()
