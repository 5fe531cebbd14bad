"""SFT throughput of the latent recurrence: the KV-cached rounds against one full pass per latent.

    python -m tools.bench_sft [--out bench.json] [--batch 4] [--blocks 2] [--latent-size 8] [--repeats 3]
                              [--hidden 128 --layers 2 ...] [--device cpu|cuda] [--dtype fp32|bf16]

Times one `monet2` student step (forward, alignment-routed loss, backward) on a batch of toy Monet rows with K latents
per block, with the fast recurrence (monet_models.transformers.latent_recurrence) and with `exact_latent_forward`, the
per-latent recurrence the fast one is tested against (monet_models.transformers.exact_recurrence). Prints one JSON object: tokens/s per
device for both, their ratio, and the largest difference between their losses and latents.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common.checkpoint_layout import torch_dtype
from monet_models.tiny_model import ModelShape, random_model
from monet_models.transformers.exact_recurrence import exact_latent_forward
from monet_models.transformers.latent_recurrence import count_rounds, recurrent_latent_forward
from RL.config import load_config
from RL.data.sft_dataset import collate_sft, sft_dataset
from RL.toy_task import corpus_lines, make_toy_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ModelShape.add_arguments(parser)
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--blocks", type=int, default=3, help="auxiliary images (latent blocks) per row")
    parser.add_argument("--latent-size", type=int, default=8)
    parser.add_argument("--image-pixels", type=int, default=3136,
                        help="every image is scaled to this many pixels (3136 = 4 tokens; Monet's are ~1000 tokens)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    return parser.parse_args(argv)


def monet2_batch(processor, args, folder: Path):
    """Toy Monet rows with `blocks` zoom steps each, laid out as monet2's student (and its teacher sequence)."""
    data = make_toy_dataset(folder, n_train=args.batch, n_val=1, seed=args.seed, sft=True)
    rows = json.loads((data / "sft_monet.json").read_text())
    for row in rows:
        assistant = row["data"][1]
        assistant["content"] = assistant["content"] * args.blocks
    (data / "bench.json").write_text(json.dumps(rows))
    config = load_config([f"data.train_files={data / 'bench.json'}", "sft.stage=monet2", "data.format_prompt=",
                          f"data.min_pixels={args.image_pixels}", f"data.max_pixels={args.image_pixels}",
                          "trainer.n_gpus_per_node=1"], require_inputs=False)
    dataset = sft_dataset(config, processor, args.latent_size)
    return collate_sft([dataset[i] for i in range(len(dataset))], processor.tokenizer.pad_token_id)


def student_step(model, batch, teacher, recurrence, device):
    """Forward (the recurrence), CE + alignment to fixed teacher states at the observation tokens, backward."""
    ids, mask = batch.tensors["input_ids"].to(device), batch.tensors["attention_mask"].to(device)
    pixels = torch.cat(list(batch.non_tensors["pixel_values"])).to(device)
    grid = torch.cat(list(batch.non_tensors["image_grid_thw"])).to(device)
    hidden, view = batch.tensors["hidden"].to(device), batch.tensors["view"].to(device)
    if recurrence == "fast":
        out, latents = recurrent_latent_forward(model, ids, mask, pixels, grid, hidden=hidden, view=view)
    else:
        out, latents, _ = exact_latent_forward(model, ids, mask, pixels, grid, hidden=hidden, view=view)
    weights = batch.tensors["response_mask"].to(device)
    selected = weights[:, 1:] > 0
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1][selected].float(), ids[:, 1:][selected], reduction="none")
    obs = batch.tensors["obs"].to(device)
    align = 1 - torch.nn.functional.cosine_similarity(out.hidden_states[obs].float(), teacher, dim=-1)
    loss = (ce * weights[:, 1:][selected]).sum() / weights.sum() + align.mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return float(loss.detach()), latents.detach().float()


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = random_model(ModelShape.from_args(args), corpus_lines(), args.seed, args.device,
                                    torch_dtype(args.dtype))
    model.train()
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as folder:
        batch = monet2_batch(processor, args, Path(folder))
    with torch.no_grad():
        teacher = torch.randn(int(batch.tensors["obs"].sum()), args.hidden, device=args.device)
    tokens = int(batch.tensors["attention_mask"].sum())
    seconds, results = {}, {}
    for recurrence in ("fast", "exact"):
        student_step(model, batch, teacher, recurrence, args.device)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            results[recurrence] = student_step(model, batch, teacher, recurrence, args.device)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds[recurrence] = statistics.median(times)
    pad = model.latent_tokens.pad
    report = {
        "what": "monet2 student step (recurrence forward, CE + alignment, backward), 1 device",
        "device": args.device, "dtype": args.dtype, "threads": args.threads,
        "shape": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                  "intermediate": args.intermediate},
        "rows": args.batch, "blocks_per_row": args.blocks, "latent_size": args.latent_size,
        "image_tokens": int((batch.tensors["input_ids"] == processor.image_token_id).sum()),
        "tokens_per_step": tokens, "latents_per_step": int((batch.tensors["input_ids"] == pad).sum()),
        "fast_rounds": count_rounds(batch.tensors["input_ids"], batch.tensors["attention_mask"], pad,
                                    batch.tensors["view"]),
        "exact_passes": int((batch.tensors["input_ids"] == pad).sum(-1).max()) + 1,
        "fast_tokens_per_s": round(tokens / seconds["fast"], 1),
        "exact_tokens_per_s": round(tokens / seconds["exact"], 1),
        "speedup": round(seconds["exact"] / seconds["fast"], 2),
        "loss_abs_diff": abs(results["fast"][0] - results["exact"][0]),
        "latents_max_abs_diff": float((results["fast"][1] - results["exact"][1]).abs().max()),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
