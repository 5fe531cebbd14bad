"""Serve a model folder through vLLM's own OpenAI-compatible server, with latent reasoning.

    python -m tools.serve MODEL_DIR [--kv-cache-gb G] [vLLM server options: --host, --port, --served-model-name,
        --lora-modules NAME=DIR, --dtype, --max-model-len, --max-num-seqs, --api-key, ...]

Every vLLM server option works as with `vllm serve`; this adds the latent plugin (the latent architecture through
--hf-overrides, the serving logits processor, the worker extension and the response middleware of
monet_models/vllm/serving.py) and the settings latent decoding needs (eager mode, no prefix caching, no async
scheduling). Every request reasons with latent blocks as the model folder's latent_config.json says; a request
changes that with flat `vllm_xargs` keys (latent, latent_size, latent_noise, latent_noise_relative, latent_seed,
latent_render, return_latents: docs/evaluation.md). Answers show each block as `<latent×K>` (or omit it).

On CPU the KV cache is --kv-cache-gb GiB (default: 1, or one sequence of --max-model-len if that needs more; never a
fraction of the host's memory), and --max-num-seqs defaults to as many sequences of --max-model-len as that cache
holds, so vLLM never has to preempt a request (a preempted latent request cannot be recomputed). On GPU vLLM sizes
its cache itself (--gpu-memory-utilization).
"""
from __future__ import annotations

import json
import logging
import os
import types

from common.cli import ArgumentParser, UsageError, run_cli
from common.model_folder import check_model_folder

logger = logging.getLogger("tools.serve")
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's own default on CPU, when the cache holds that many
VLLM_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}


def split_argv(argv: list[str]) -> tuple[types.SimpleNamespace, list[str]]:
    """(MODEL_DIR and this command's own options, the vLLM server options)."""
    if not argv or argv[0].startswith("-"):
        raise UsageError("expected MODEL_DIR first, then vLLM server options (python -m tools.serve --help)")
    parser = ArgumentParser(prog="python -m tools.serve", add_help=False, allow_abbrev=False)
    parser.add_argument("--kv-cache-gb", type=float, default=0.0)
    ours, rest = parser.parse_known_args(argv[1:])
    if ours.kv_cache_gb < 0:
        raise UsageError(f"--kv-cache-gb: must be >= 0 GiB (0 = the default), got {ours.kv_cache_gb}")
    check_model_folder(argv[0], "MODEL_DIR")
    return types.SimpleNamespace(model=argv[0], kv_cache_gb=ours.kv_cache_gb), rest


def server_args(model: str, kv_cache_gb: float, rest: list[str], on_gpu: bool):
    """vLLM's server namespace for `rest`, with the plugin and what latent decoding needs added."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from monet_models.vllm import LATENT_ARCHITECTURE, WORKER_EXTENSION

    args = make_arg_parser(FlexibleArgumentParser(prog="python -m tools.serve MODEL_DIR")).parse_args(
        ["--model", model, *rest])
    if args.enable_prefix_caching:
        raise UsageError("--enable-prefix-caching: latent decoding needs it off (a pad's KV depends on its latent)")
    if args.worker_extension_cls not in ("", WORKER_EXTENSION):
        raise UsageError(f"--worker-extension-cls: the server needs {WORKER_EXTENSION}")
    if callable(args.hf_overrides):
        raise UsageError("--hf-overrides: give a JSON object (the server adds the latent architecture to it)")
    args.hf_overrides = {**(args.hf_overrides or {}), "architectures": [LATENT_ARCHITECTURE]}
    args.logits_processors = [*(args.logits_processors or []), "monet_models.vllm.serving:ServingLogitsProcessor"]
    args.worker_extension_cls = WORKER_EXTENSION
    args.middleware = [*args.middleware, "monet_models.vllm.serving.LatentServingMiddleware"]
    args.enable_prefix_caching, args.enforce_eager, args.async_scheduling = False, True, False
    args.limit_mm_per_prompt = {"video": 0, **(args.limit_mm_per_prompt or {})}
    if args.lora_modules and args.enable_lora is None:
        args.enable_lora = True
    if not on_gpu:
        size_cpu_cache(args, model, kv_cache_gb)
    validate_parsed_serve_args(args)
    return args


def size_cpu_cache(args, model: str, kv_cache_gb: float) -> None:
    """The CPU KV cache in bytes (unless --kv-cache-memory-bytes or VLLM_CPU_KVCACHE_SPACE says) and a
    --max-num-seqs whose sequences all fit in it."""
    from workers.rollout.vllm_engine import CPU_BLOCK_SIZE, _text_config, cpu_kv_cache_bytes, kv_bytes_per_token

    dtype = VLLM_DTYPES.get(args.dtype) or _model_dtype(model)
    config = types.SimpleNamespace(dtype=dtype, max_num_seqs=1, max_model_len=args.max_model_len or 0,
                                   block_size=args.block_size or 0, cpu_kvcache_space_gb=kv_cache_gb)
    if args.kv_cache_memory_bytes is None or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        args.kv_cache_memory_bytes = cpu_kv_cache_bytes(model, config)
    block = args.block_size or CPU_BLOCK_SIZE
    max_len = args.max_model_len or _text_config(model).max_position_embeddings
    sequences = args.kv_cache_memory_bytes // kv_bytes_per_token(model, dtype) // (-(-max_len // block) * block)
    if args.max_num_seqs is None:
        args.max_num_seqs = max(1, min(DEFAULT_MAX_NUM_SEQS, sequences))
    elif args.max_num_seqs > sequences:
        logger.warning("--max-num-seqs %d: the KV cache holds %d sequences of %d tokens; under load vLLM may preempt "
                       "a latent request, which fails it (raise --kv-cache-gb or lower --max-model-len)",
                       args.max_num_seqs, sequences, max_len)


def _model_dtype(model: str) -> str:
    """vLLM's `auto` dtype on CPU: the checkpoint's own."""
    config = json.loads(open(os.path.join(model, "config.json")).read())
    name = str(config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("dtype"))
    return VLLM_DTYPES.get(name, "bf16")


def main(argv: list[str]) -> int:
    ours, rest = split_argv(argv)  # refused before vLLM loads
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the plugin needs vLLM's V1 model runner (vllm_engine.py)
    import torch
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()
    args = server_args(ours.model, ours.kv_cache_gb, rest, torch.cuda.is_available())
    uvloop.run(run_server(args))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(main, usage=__doc__)
