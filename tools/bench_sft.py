"""SFT throughput of the latent recurrence: the KV-cached rounds against one full pass per latent.

    python -m tools.bench_sft [--out bench.json] [--batch 4] [--blocks 2] [--latent-size 8] [--repeats 3]
                              [--hidden 128 --layers 2 ...] [--device cpu|cuda] [--dtype fp32|bf16]

Times one `monet2` student step (forward, alignment-routed loss, backward) on a batch of toy Monet rows with K latents
per block, with the fast recurrence (monet_models.transformers.latent_recurrence) and with `exact_latent_forward`, the
per-latent recurrence kept here as the reference the fast one is tested against. Prints one JSON object: tokens/s per
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

from monet_models.transformers.latent_recurrence import base_model, captured_layers, image_features


def visibility_mask(attention_mask, hidden=None, view=None) -> torch.Tensor:
    """(B, 1, L, L) bool: causal, valid keys, hidden spans only for their view; every row sees itself (no NaN rows)."""
    batch, length = attention_mask.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    if hidden is not None:
        visible = (hidden[:, None, :] == 0) | (hidden[:, None, :] == view[:, :, None])
        allowed &= visible
    allowed |= torch.eye(length, dtype=torch.bool, device=attention_mask.device)[None]
    return allowed[:, None]


def exact_latent_forward(model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *, hidden=None,
                         view=None, layers=()):
    """The per-latent recurrence: with every latent unknown, pass i fixes the i-th latent of each sample (attention is
    causal), so after as many passes as the most latents in a sample one more pass gives the outputs. Returns
    (last pass output, latents (pads, D) row-major, {layer: (B, L, D)}); gradients flow through every pass."""
    base = base_model(model)
    pads = input_ids == base.latent_tokens.pad
    rows, cols = pads.nonzero(as_tuple=True)
    passes = int(pads.sum(-1).max()) if rows.numel() else 0
    positions, _ = base.mrope_positions(input_ids, attention_mask, image_grid_thw)
    mask = visibility_mask(attention_mask, hidden, view)
    images = image_features(model, pixel_values, image_grid_thw) if pixel_values is not None else None
    latents = torch.zeros(rows.numel(), base.config.text_config.hidden_size, device=input_ids.device)
    for step in range(passes + 1):
        with captured_layers(model, layers) as calls:
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, image_embeds=images,
                        latent_embeds=latents, latent_mode=True)
        if step < passes:
            latents = out.hidden_states[rows, cols - 1]
    return out, latents, {index: values[0] for index, values in calls.items()}


def parse_args(argv=None):
    from tools.bench_rollout import add_model_shape_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_shape_args(parser)
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
    from RL.config import load_config
    from RL.data.sft_dataset import collate_sft, sft_dataset
    from tools.toy_task import make_toy_dataset

    data = make_toy_dataset(folder, n_train=args.batch, n_val=1, seed=args.seed, sft=True)
    rows = json.loads((data / "sft_monet.json").read_text())
    for row in rows:
        assistant = row["data"][1]
        assistant["content"] = assistant["content"] * args.blocks
    (data / "bench.json").write_text(json.dumps(rows))
    config = load_config([f"sft.train_files={data / 'bench.json'}", "sft.stage=monet2", "data.format_prompt=",
                          f"data.min_pixels={args.image_pixels}", f"data.max_pixels={args.image_pixels}",
                          "trainer.n_gpus_per_node=1"], require_inputs=False)
    dataset = sft_dataset(config, processor, args.latent_size)
    return collate_sft([dataset[i] for i in range(len(dataset))], processor.tokenizer.pad_token_id)


def student_step(model, batch, teacher, recurrence, device):
    """Forward (the recurrence), CE + alignment to fixed teacher states at the observation tokens, backward."""
    from monet_models.transformers.latent_recurrence import recurrent_latent_forward

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
    from monet_models.transformers.latent_recurrence import count_rounds
    from tools.bench_rollout import random_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, processor = random_model(args, dtype)
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
