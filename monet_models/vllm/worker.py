"""Methods added to every vLLM worker (`LLM(worker_extension_cls=WORKER_EXTENSION)`), called by the rollout
engine through `llm.collective_rpc(name, args=...)`. Results are plain Python values: they cross vLLM's RPC
transport, which does not carry tensors intact."""
from __future__ import annotations

from safetensors import safe_open

from monet_models.vllm.logits import LatentBlockLogitsProcessor


class LatentWorkerExtension:
    def monet_collect(self, keys: list[str]) -> dict[str, dict]:
        """{key: {"log_probs": [...], "latents": [[...], ...], "open_block": bool}} of finished requests."""
        return self._latent_processor().collect(keys)

    def monet_engine_info(self) -> dict:
        """KV capacity in tokens (to rule out preemption before generating) and the block size."""
        config = self.model_runner.kv_cache_config
        block_size = config.kv_cache_groups[0].kv_cache_spec.block_size
        return {"kv_tokens": config.num_blocks * block_size, "block_size": block_size}

    def monet_reload_weights(self, path: str) -> None:
        """Load a safetensors file of Hugging Face-named tensors in place through vLLM's official reload path
        (vLLM repacks weights after loading, so a plain `load_weights` would not do)."""
        self.reload_weights(weights_iterator=_safetensors_items(path), is_checkpoint_format=True)

    def _latent_processor(self) -> LatentBlockLogitsProcessor:
        for processor in self.model_runner.input_batch.logitsprocs.all:
            if isinstance(processor, LatentBlockLogitsProcessor):
                return processor
        raise RuntimeError("the engine runs without LatentBlockLogitsProcessor: pass "
                           "logits_processors=[monet_models.vllm.LOGITS_PROCESSOR] to vllm.LLM")


def _safetensors_items(path: str):
    with safe_open(path, framework="pt") as handle:
        for name in handle.keys():
            yield name, handle.get_tensor(name)
