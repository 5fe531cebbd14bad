"""Answer one prompt with latent reasoning, from any checkpoint of this project (a merged model included).

    python -m tools.generate --model DIR --image X [--image Y] --prompt "..." [--strategy monet|greedy|sample]
        [--engine native|vllm] [--max-new-tokens N] [--latent-size K] [--temperature T] [--n N] [--seed S]

Plain transformers `generate` cannot run these models: it never feeds a latent, so after `<abs_vis_token>` the model
sees its own pad tokens and keeps opening blocks. This runs the project's engines, which feed each latent step the
previous hidden state, and prints each response with its latent blocks rendered as `<latent×K>` (K steps).
`monet` (default) is greedy text with latent blocks (temperature 0) unless --temperature is given. The model folder's
latent_config.json (written by every run, merge and SFT export: monet_models/run_settings.py) supplies the defaults of
--latent-size and --strategy, the prompt template and the image pixel range, so a model answers as it was trained.
"""
from __future__ import annotations

import types
from pathlib import Path

from common.cli import ArgumentParser, UsageError, run_cli
from common.model_folder import check_model_folder
from monet_models.latent_tokens import LatentTokens, default_latent_size
from monet_models.run_settings import RunSettingsError, read_run_settings

STRATEGIES = ("monet", "greedy", "sample")


def parse_args(argv: list[str]):
    parser = ArgumentParser(prog="python -m tools.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Qwen2.5-VL folder of this project (SFT, RL or merged)")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--prompt", required=True, help="the question; <image> marks where images go (default: first)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=None,
                        help="default: the model folder's sampling strategy, else monet")
    parser.add_argument("--engine", choices=("native", "vllm"), default="native")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--latent-size", type=int, default=None,
                        help="K latent steps per block (default: the model folder's, else LATENT_SIZE, else 10)")
    parser.add_argument("--temperature", type=float, default=None, help="default: 0 for monet and greedy, 1 for sample")
    parser.add_argument("--n", type=int, default=1, help="responses to sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="default: bf16 on GPU, else fp32")
    parser.add_argument("--kv-cache-gb", type=float, default=0.0,
                        help="--engine vllm on CPU: KV cache GiB (worker.rollout.cpu_kvcache_space_gb; default: what "
                             "the request needs, at least 1)")
    args = parser.parse_args(argv)
    missing = [path for path in args.image if not Path(path).is_file()]
    if missing:
        raise UsageError(f"--image: no such file {missing[0]}")
    if args.max_new_tokens < 1 or args.n < 1 or (args.latent_size is not None and args.latent_size < 1):
        raise UsageError("--max-new-tokens, --n and --latent-size must be >= 1")
    if args.kv_cache_gb < 0:
        raise UsageError(f"--kv-cache-gb: must be >= 0 GiB (0 = what the request needs), got {args.kv_cache_gb}")
    if args.strategy == "sample" and args.temperature == 0:
        raise UsageError("--temperature 0 with --strategy sample is greedy decoding: use --strategy greedy")
    check_model_folder(args.model, "--model")
    return args


def model_settings(model: str) -> dict:
    """What the model folder's latent_config.json records ({} for a folder without one)."""
    try:
        return read_run_settings(model)
    except RunSettingsError as error:
        raise UsageError(f"--model: {error}") from None


def build_prompt(processor, text: str, image_paths: list[str], settings: dict | None = None):
    """The chat-templated prompt with its images, through the folder's template and fitted to its pixel range (else
    the processor's) as the datasets do."""
    from RL.data import load_image  # here and below: torch and transformers load only after the checks of parse_args
    from RL.data.format_prompt import IMAGE_MARKER, FormatPrompt
    from RL.evaluate.item_prompts import encode

    settings, size = settings or {}, processor.image_processor.size
    limits = types.SimpleNamespace(min_pixels=settings.get("min_pixels", size["shortest_edge"]),
                                   max_pixels=settings.get("max_pixels", size["longest_edge"]))
    images = [load_image(path, None, limits.min_pixels, limits.max_pixels) for path in image_paths]
    if images and IMAGE_MARKER not in text:
        text = IMAGE_MARKER * len(images) + text
    text = FormatPrompt(settings.get("format_prompt"))(text)
    if text.count(IMAGE_MARKER) != len(images):
        raise UsageError(f"--prompt has {text.count(IMAGE_MARKER)} <image> markers for {len(images)} --image files")
    return encode(processor, text, images, limits)


def build_engine(args, dtype: str, prompt_length: int = 0):
    if args.engine == "vllm":
        import os

        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout holds only the responses
        from workers.rollout.vllm_engine import VLLMRolloutEngine

        # one request's worth of engine: what the CPU KV cache is sized from when --kv-cache-gb is not given
        config = types.SimpleNamespace(dtype=dtype, max_num_seqs=args.n, cpu_kvcache_space_gb=args.kv_cache_gb,
                                       max_model_len=prompt_length + args.max_new_tokens)
        return VLLMRolloutEngine(args.model, config, seed=args.seed)
    import torch

    from monet_models.transformers import load_latent_model
    from workers.rollout.native import NativeRolloutEngine

    model, processor = load_latent_model(args.model, dtype=dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return NativeRolloutEngine(model.to(device).eval(), processor.tokenizer)


def main(argv: list[str]) -> int:
    args = parse_args(argv)  # refused before torch loads
    import torch

    from monet_models import load_processor
    from RL.trainer.rollout_batch import render_response
    from workers.rollout.base import SamplingParams

    settings = model_settings(args.model)
    processor = load_processor(args.model)
    prompt = build_prompt(processor, args.prompt, args.image, settings)
    strategy = args.strategy or settings.get("sampling_strategy", "monet")
    temperature = args.temperature if args.temperature is not None else (1.0 if strategy == "sample" else 0.0)
    params = SamplingParams(n=args.n, temperature=temperature, max_new_tokens=args.max_new_tokens,
                            strategy=strategy, latent_size=args.latent_size or settings.get("latent_size")
                            or default_latent_size(), seed=args.seed)
    engine = build_engine(args, args.dtype or ("bf16" if torch.cuda.is_available() else "fp32"),
                          len(prompt.input_ids))
    tokens = LatentTokens.from_tokenizer(processor.tokenizer)
    for sample in engine.generate([prompt], params):
        prefix = f"[{sample.sample_index}] " if args.n > 1 else ""
        print(prefix + render_response(processor.tokenizer, sample.response_ids, tokens))
    return 0


if __name__ == "__main__":
    run_cli(main)
