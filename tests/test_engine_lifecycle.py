"""The rollout engine's lifecycle in a training run, the streamed weight sync, and meta-device loading.

One VLPO trainer on a local Ray cluster (two gloo ranks, colocated native engines) runs validation, one step and
validation again; its workers wrap the engine in a recorder, so the calls the engine received can be read back. The
same workers then compare the streamed sync with the old full-state-dict sync, the meta-device load with a load on
every rank, and finally switch to LoRA to check that an adapter sync writes no file.
"""
import copy
import os
import sys
import tempfile
from collections.abc import Mapping

import pytest
import ray
import torch

from RL.config import load_config
from tests.helpers import read_metrics
from workers.actor.host_bucket import SHM_DIR
from workers.policy_worker import PolicyWorker, owned_copies
from workers.rollout.base import WAKE_TAGS, RolloutEngine, SamplingParams, weights_items

pytestmark = pytest.mark.slow  # a Ray cluster with two ranks
ADAPTERS = ["solver", "proposer"]


class RecordingEngine(RolloutEngine):
    """Forwards every call to the real engine and records it: "sleep", "wake_up:<tags>", "update_weights:<stream or
    dict>", "update_adapter:<name>", "generate"."""

    def __init__(self, inner: RolloutEngine):
        self.inner, self.calls = inner, []
        self.latent_overrides = inner.latent_overrides

    def generate(self, prompts, params, lora=None):
        self.calls.append("generate")
        return self.inner.generate(prompts, params, lora)

    def update_weights(self, weights):
        self.calls.append(f"update_weights:{'dict' if isinstance(weights, Mapping) else 'stream'}")
        self.inner.update_weights(weights)

    def update_adapter(self, name, tensors, config):
        self.calls.append(f"update_adapter:{name}")
        self.inner.update_adapter(name, tensors, config)

    def sleep(self):
        self.calls.append("sleep")
        self.inner.sleep()

    def wake_up(self, tags=WAKE_TAGS):
        self.calls.append(f"wake_up:{','.join(tags)}")
        self.inner.wake_up(tags)


_WRITES: list[str] | None = None  # paths opened for writing while a check records them


def _record_writes(event: str, args) -> None:
    if _WRITES is not None and event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
            (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing:
            _WRITES.append(str(path))


class LifecycleWorker(PolicyWorker):
    """A policy worker whose engine records its calls, with the checks the tests run on every rank."""

    def _build_engine(self, path: str) -> None:
        super()._build_engine(path)
        self.engine = RecordingEngine(self.engine)

    def engine_calls(self) -> list[str]:
        calls, self.engine.calls = self.engine.calls, []
        return calls

    def generate_error(self, prompts) -> str:
        try:
            self.engine.inner.generate(prompts, SamplingParams(strategy="greedy", max_new_tokens=2))
        except RuntimeError as error:
            return str(error)
        return ""

    def compare_syncs(self, prompts, bucket_mb: float, host_bucket: bool) -> dict:
        """Greedy outputs and engine weights after the old sync (the full state dict gathered at once) and after the
        streamed one (`begin_rollout` with `sync_bucket_mb`, through the host's shared bucket or, as on a GPU or
        across hosts, all-gathers), each from the checkpoint's weights."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from monet_models.transformers import load_latent_model

        engine, params = self.engine.inner, SamplingParams(strategy="greedy", max_new_tokens=12)
        initial = load_latent_model(self.config.worker.actor.model.model_path,
                                    dtype=self.config.worker.rollout.dtype)[0].state_dict()
        self.begin_rollout()
        engine.update_weights(initial)
        before = engine.generate(prompts, params)
        engine.update_weights(get_model_state_dict(self.model.module, options=StateDictOptions(full_state_dict=True)))
        old = engine.generate(prompts, params), {k: v.clone() for k, v in engine.model.state_dict().items()}
        engine.update_weights(initial)
        self.end_rollout()
        self.config.worker.rollout.sync_bucket_mb = bucket_mb
        self.model._bucket = None if host_bucket else False  # False: the ranks cannot share memory
        self._actor_changed()  # as after an update: the next phase streams
        self.begin_rollout()
        new = engine.generate(prompts, params), engine.model.state_dict()
        self.end_rollout()
        return {
            "same_tokens": [a.response_ids.tolist() == b.response_ids.tolist() for a, b in zip(old[0], new[0])],
            "same_log_probs": [torch.equal(a.token_log_probs, b.token_log_probs) for a, b in zip(old[0], new[0])],
            "same_weights": old[1].keys() == new[1].keys() and all(torch.equal(old[1][k], new[1][k]) for k in old[1]),
            "through_host_bucket": bool(self.model._bucket),
            "update_moved_log_probs": any(not torch.equal(a.token_log_probs, b.token_log_probs)
                                          for a, b in zip(before, old[0])),
        }

    def compare_loading(self, lora_rank: int) -> dict:
        """A model loaded the new way (rank 0 reads, the others on the meta device) against the old way (every rank
        loads the checkpoint, then shards): the gathered state dicts, the buffers and the tied weights."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from monet_models.transformers import load_latent_model
        from workers.actor.fsdp import shard_model
        from workers.actor.lora import apply_lora
        from workers.actor.model_inputs import unwrapped
        from workers.actor.sharded_model import ShardedModel, _load_dtype

        actor = copy.deepcopy(self.config.worker.actor)
        actor.model.lora.rank, actor.model.lora.alpha = lora_rank, 2 * lora_rank
        adapters = ADAPTERS if lora_rank else []
        torch.manual_seed(7)
        new = ShardedModel(actor.model.model_path, actor, trainable=True, adapters=adapters)
        torch.manual_seed(7)
        model = load_latent_model(actor.model.model_path, dtype=_load_dtype(actor, actor.fsdp, True))[0]
        if adapters:
            model = apply_lora(model.requires_grad_(False), actor.model.lora, adapters)
        old = shard_model(model, reshard_after_forward=actor.fsdp.enable_full_shard)
        full = StateDictOptions(full_state_dict=True)
        new_state, old_state = get_model_state_dict(new.module, options=full), get_model_state_dict(old, options=full)
        new_buffers, old_buffers = dict(new.module.named_buffers()), dict(old.named_buffers())
        return {"keys": len(new_state), "same_keys": new_state.keys() == old_state.keys(),
                "differ": [k for k in new_state if not torch.equal(new_state[k], old_state[k])],
                "buffers": len(new_buffers), "buffers_differ": [k for k in new_buffers
                                                                if not torch.equal(new_buffers[k], old_buffers[k])],
                "lora_keys": sum(".lora_" in k for k in new_state), "dtype": str(next(iter(new_state.values())).dtype),
                "no_meta": not any(p.is_meta for p in new.module.parameters()),
                "grads_on": sorted({k.split(".lora_")[0] != k for k, p in new.module.named_parameters()
                                    if p.requires_grad}) if adapters else None,
                "model_type": type(unwrapped(new.module)).__name__}

    def lora_sync_writes(self, tmpdir: str) -> dict:
        """Move every adapter of the actor, sync it into the engine with TMPDIR pointing at an empty folder and every
        Python file open recorded; return what was written and whether the engine serves the actor's adapters."""
        global _WRITES
        from common.checkpoint_layout import PEFT_PREFIX
        from workers.actor.lora import is_adapter_key, saved_adapter_key

        with torch.no_grad():
            for name, param in self.model.module.named_parameters():
                if ".lora_" in name:
                    param.add_(0.01 * (1 + self.model.adapters.index(name.split(".")[-2])))
        self._actor_changed()
        os.environ["TMPDIR"], tempfile.tempdir = tmpdir, None
        if not getattr(LifecycleWorker, "_hooked", False):
            sys.addaudithook(_record_writes)
            LifecycleWorker._hooked = True
        _WRITES = []
        try:
            self.begin_rollout()
        finally:
            writes, _WRITES = _WRITES, None
        engine = {name: {PEFT_PREFIX + saved_adapter_key(key, name): value
                         for key, value in self.engine.inner.model.named_parameters() if is_adapter_key(key, name)}
                  for name in self.model.adapters}
        served = all(
            engine[name].keys() == actor.keys() and all(torch.equal(engine[name][k], v) for k, v in actor.items())
            for name, actor in ((name, owned_copies(self.model.stream_weights(name))) for name in self.model.adapters))
        self.end_rollout()
        return {"files": os.listdir(tmpdir), "opened_for_writing": writes, "served": served,
                "calls": self.engine_calls()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, toy_data_dir):
    """The trainer after validation, one step and validation again: (trainer, metrics lines, each rank's engine
    calls since it was built)."""
    from monet_models import load_processor
    from RL.data import build_datasets, build_loader
    from RL.train_vlpo import prepare_run
    from RL.trainer.vlpo import VLPOTrainer
    from tests.test_vlpo_ray import overrides

    class LifecycleTrainer(VLPOTrainer):
        worker_class = LifecycleWorker

    root = tmp_path_factory.mktemp("lifecycle")
    config = load_config(overrides(root, toy_data_dir, tiny_model_dir, "lifecycle", **{
        "trainer.n_gpus_per_node": 2, "trainer.max_steps": 1, "trainer.save_freq": -1,
        "trainer.val_before_train": True, "trainer.val_freq": 1, "data.val_batch_size": 4}))
    processor = load_processor(tiny_model_dir)
    train_set, val_set = build_datasets(config.data, processor)
    prepare_run(config)
    trainer = LifecycleTrainer(config, build_loader(train_set, config.data, "train"), val_set, processor, 1)
    try:
        trainer.fit()
        yield trainer, read_metrics(trainer.run_dir), trainer.policy.call("engine_calls")
    finally:
        trainer.shutdown()


def _encode(model_dir):
    """Three image prompts of different lengths and image sizes (the engine tests' questions)."""
    from monet_models import load_processor
    from tests.helpers import ENGINE_QUESTIONS, coloured_image, encode_prompts
    from workers.rollout import prompt_inputs_from_batch

    processor = load_processor(model_dir)
    enc = encode_prompts(processor, ENGINE_QUESTIONS, [coloured_image(), coloured_image((0, 200, 0), 84),
                                                       coloured_image((0, 0, 200), 112)])
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return prompt_inputs_from_batch(enc["input_ids"], enc["attention_mask"], image_token, enc["pixel_values"],
                                    enc["image_grid_thw"])


def phases(calls: list[str]) -> list[str]:
    """The calls with each run of `generate` collapsed to one."""
    return [call for i, call in enumerate(calls) if call != "generate" or calls[i - 1] != "generate"]


def test_training_step_drives_the_engine_in_order(run, tiny_model_dir):
    trainer, metrics, calls = run
    wake_weights, wake_kv, stream = "wake_up:weights", "wake_up:kv_cache", "update_weights:stream"
    expected = ["sleep",  # right after it was built
                wake_weights, stream, wake_kv, "generate", "sleep",  # validation: the first sync
                wake_weights, wake_kv, "generate", "sleep",  # step 1's rollouts: nothing changed since
                wake_weights, stream, wake_kv, "generate", "sleep"]  # validation after the update: synced again
    assert [phases(rank) for rank in calls] == [expected, expected]
    step = metrics[-1]
    assert step["step"] == 1 and step["timing_s/sync_weights"] == 0.0  # the sync was skipped, not just fast
    assert step["timing_s/val_sync_weights"] > 0.0 and metrics[0]["timing_s/val_sync_weights"] > 0.0
    errors = trainer.policy.call("generate_error", _encode(tiny_model_dir))
    assert all("call wake_up() before generating" in error for error in errors)  # the engines sleep now


def test_streamed_sync_equals_the_full_state_dict_sync(run, tiny_model_dir):
    trainer, _, _ = run
    # one parameter at a time; buckets of several parameters; through shared memory or all-gathers
    for bucket_mb, host_bucket in ((0.0, True), (0.05, True), (0.0, False), (0.05, False)):
        for result in trainer.policy.call("compare_syncs", _encode(tiny_model_dir), bucket_mb, host_bucket):
            assert all(result["same_tokens"]) and all(result["same_log_probs"]) and result["same_weights"]
            assert result["through_host_bucket"] == host_bucket
            assert result["update_moved_log_probs"]  # the step changed the weights: the comparison means something


def test_meta_device_loading_equals_loading_on_every_rank(run):
    trainer, _, _ = run
    for lora_rank in (0, 4):
        for result in trainer.policy.call("compare_loading", lora_rank):
            assert result["same_keys"] and result["differ"] == [] and result["buffers_differ"] == []
            assert result["no_meta"] and result["buffers"] > 0 and result["dtype"] == "torch.float32"
            assert result["lora_keys"] == (56 if lora_rank else 0)  # 2 adapters x 14 layers x (A, B)
            if lora_rank:
                assert result["grads_on"] == [True]  # only adapter weights train


def test_lora_sync_streams_adapters_in_memory_without_files(run, tmp_path):
    trainer, _, _ = run
    config = copy.deepcopy(trainer.config)
    config.worker.actor.model.lora.rank, config.worker.actor.model.lora.alpha = 4, 8
    trainer.policy.call("init_roles", config, ["actor", "rollout"], ADAPTERS, 1)
    folders = [tmp_path / f"rank{rank}" for rank in range(trainer.world_size)]
    for folder in folders:
        folder.mkdir()
    results = ray.get([worker.lora_sync_writes.remote(str(folder))
                       for worker, folder in zip(trainer.policy.workers, folders)])
    for result in results:
        # the only file opened: the host's shared-memory sync bucket (tmpfs, unlinked once every rank mapped it)
        bucket = [path for path in result["opened_for_writing"] if path.startswith(f"{SHM_DIR}/latent_rl_sync_")]
        assert result["files"] == [] and result["opened_for_writing"] == bucket
        assert not any(os.path.exists(path) for path in bucket)
        assert result["served"]
        assert phases(result["calls"])[-5:] == ["wake_up:weights", "update_adapter:solver", "update_adapter:proposer",
                                               "wake_up:kv_cache", "sleep"]
