"""Methods added to every vLLM worker (`LLM(worker_extension_cls=WORKER_EXTENSION)`), called by the rollout
engine through `llm.collective_rpc(name, args=...)`.

The engine runs vLLM in its own process (`external_launcher`: no engine-core or worker processes), so these calls
are plain method calls: tensors, generators and config objects arrive as they are, and results come back as they
are. Nothing here writes a file.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from monet_models.vllm.channel import LatentChannel
from monet_models.vllm.logits import LatentBlockLogitsProcessor


class LatentWorkerExtension:
    def monet_collect(self, keys: list[str]) -> dict[str, dict]:
        """{key: {"log_probs": (T,) fp32, "latents": (num_latents, D) fp32 or None, "open_block": bool}}."""
        return self._latent_processor().collect(keys)

    def monet_collect_latents(self, keys: list[str]) -> dict[str, list[list[float]]]:
        """{key: the request's latents as lists of floats}: what crosses vLLM's process boundary intact (the server
        runs the engine in its own process and collects the latents of `return_latents` requests this way)."""
        records = self._latent_processor().collect(keys)
        return {key: [] if record["latents"] is None else record["latents"].tolist()
                for key, record in records.items()}

    def monet_engine_info(self) -> dict:
        """Checks the model runner the plugin relies on, then reports the KV capacity in tokens (to rule out
        preemption before generating) and the block size."""
        check_model_runner(self.model_runner)
        config = self.model_runner.kv_cache_config
        block_size = config.kv_cache_groups[0].kv_cache_spec.block_size
        return {"kv_tokens": config.num_blocks * block_size, "block_size": block_size}

    def monet_reload_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named (name, tensor) pairs in place through vLLM's official reload path (vLLM repacks
        weights after loading, so a plain `load_weights` would not do). The iterable is consumed once, as it comes:
        vLLM keeps a layer's tensors only until the layer is complete, so a generator in the model's parameter order
        never holds the whole model. vLLM drops every LoRA adapter here (they were computed for the old base)."""
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)

    def monet_add_lora(self, lora_id: int, tensors: Mapping[str, torch.Tensor], peft_config: dict) -> None:
        """Serve a LoRA adapter from tensors in peft's saved naming, as adapter `lora_id`, with no folder: the
        tensors become a `LoRAModel` (`LoRAModel.from_lora_tensors`, what vLLM's own folder loader ends with) and
        enter the worker's adapter cache, where requests carrying `LoRARequest(..., lora_id, ...)` find it."""
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        manager = self.model_runner.lora_manager
        helper = PEFTHelper.from_dict({**peft_config, "vllm_max_position_embeddings": manager.max_position_embeddings})
        helper.validate_legal(manager.lora_config)
        cache = manager._adapter_manager  # vLLM's LRU cache of adapters on this worker
        mapper = getattr(cache.model, "hf_to_vllm_mapper", None)
        # A copy: vLLM folds the scaling into lora_B in place (LoRALayerWeights.optimize), which must not reach the
        # caller's tensors; an adapter is small next to the model.
        own = {name: tensor.detach().to("cpu", copy=True) for name, tensor in tensors.items()}
        lora = LoRAModel.from_lora_tensors(
            lora_id, own, helper, device="cpu", dtype=manager.lora_config.lora_dtype,
            model_vocab_size=manager.vocab_size, weights_mapper=mapper.get_rename_mapper() if mapper else None,
            skip_prefixes=getattr(cache.model, "lora_skip_prefixes", None))
        if not lora.loras:
            raise ValueError(f"LoRA adapter {lora_id}: none of its {len(tensors)} tensors names a LoRA matrix "
                             "(expected peft's saved naming, base_model.model.<module>.lora_A.weight)")
        cache.remove_adapter(lora_id)
        if len(cache) + 1 > cache.capacity:
            raise RuntimeError(f"the worker's LoRA cache is full ({cache.capacity} adapters): raise max_loras")
        cache.add_adapter(lora)

    def monet_latent_buffer_bytes(self) -> int:
        """What the latent side buffer holds now (tests check it against `latent_buffer_bytes`)."""
        return LatentChannel.current().allocated_bytes

    def monet_free_latent_buffer(self) -> None:
        """Give the latent side buffer back (the engine sleeps); it is allocated again at the next latent."""
        LatentChannel.current().free()

    def _latent_processor(self) -> LatentBlockLogitsProcessor:
        for processor in self.model_runner.input_batch.logitsprocs.all:
            if isinstance(processor, LatentBlockLogitsProcessor):
                return processor
        raise RuntimeError("the engine runs without LatentBlockLogitsProcessor: pass "
                           "logits_processors=[monet_models.vllm.LOGITS_PROCESSOR] to vllm.LLM")


def check_model_runner(runner) -> None:
    """The plugin reads the V1 model runner's persistent batch (`input_batch.logitsprocs`), its KV cache config and
    its attention metadata, and plugs a V1 logits processor into its sampler: vLLM's V1 GPU runner and its CPU
    subclass. vLLM's V2 runner (the GPU default of vLLM 0.32 when Triton is present) has none of these."""
    import vllm
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(runner, GPUModelRunner) or not hasattr(runner, "input_batch"):
        raise RuntimeError(
            f"the latent vLLM plugin needs vLLM's V1 model runner (GPUModelRunner or CPUModelRunner), but vLLM "
            f"{vllm.__version__} runs {type(runner).__module__}.{type(runner).__qualname__}; start the engine with "
            "VLLM_USE_V2_MODEL_RUNNER=0 (the rollout engine sets it unless the environment says otherwise)")
