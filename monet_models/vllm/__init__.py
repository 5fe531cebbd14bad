"""vLLM side of the latent token layout: Monet latent blocks inside vLLM, through vLLM's extension points only.

- `model.LatentQwen2_5_VLForConditionalGeneration` (registered as LATENT_ARCHITECTURE by the `vllm.general_plugins`
  entry point in setup.py) feeds latents at `<abs_vis_token_pad>` inputs;
- `logits.LatentBlockLogitsProcessor` (LOGITS_PROCESSOR) forces the blocks, places the latents and records
  log-probs for requests that carry `request.LatentRequestArgs` in `SamplingParams.extra_args`;
- `worker.LatentWorkerExtension` (WORKER_EXTENSION) hands the records back, reloads weights from an iterator, adds
  LoRA adapters from tensors and checks the model runner;
- `channel.latent_buffer_bytes` is the size of the latent side buffer (outside vLLM's memory budget), for planners.

Importing this package does not import vLLM; the engine that wires these together is
`workers.rollout.vllm_engine.VLLMRolloutEngine`.
"""
from monet_models.vllm.channel import latent_buffer_bytes
from monet_models.vllm.request import EXTRA_ARGS_KEY, LatentRequestArgs

LATENT_ARCHITECTURE = "LatentQwen2_5_VLForConditionalGeneration"
MODEL_CLASS = "monet_models.vllm.model:LatentQwen2_5_VLForConditionalGeneration"
LOGITS_PROCESSOR = "monet_models.vllm.logits:LatentBlockLogitsProcessor"
WORKER_EXTENSION = "monet_models.vllm.worker.LatentWorkerExtension"

__all__ = ["EXTRA_ARGS_KEY", "LatentRequestArgs", "LATENT_ARCHITECTURE", "MODEL_CLASS", "LOGITS_PROCESSOR",
           "WORKER_EXTENSION", "latent_buffer_bytes"]
