"""Latent SFT warm start: `python -m RL.sft worker.actor.model.model_path=DIR data.train_files=F sft.output_dir=OUT`.

Each training row becomes  prompt → `<abs_vis_token>` K×`<abs_vis_token_pad>` `</abs_vis_token>` "The answer is
\\boxed{answer}." so the model learns to open a latent block, think in it and answer in the VLPO reward's format.
A row with a `response` field is trained on that text instead, each `<latent>` in it becoming one latent block
(the proposer–solver warm start). The loss (RL/latent_sft_loss.py) is Monet's layout with text CE.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

from RL.config import ConfigError, load_config
from tools.cli import run_cli

ANSWER_TEMPLATE = "The answer is \\boxed{{{answer}}}."


LATENT_MARK = "<latent>"


def response_ids(tokenizer, tokens, item: dict, latent_size: int) -> list[int]:
    """The target ids of a row: its `response` text (`<latent>` = one block), else a block and the boxed answer."""
    text = item.get("extra", {}).get("response")
    if text is None:
        text = LATENT_MARK + ANSWER_TEMPLATE.format(answer=item["ground_truth"])
    block = [tokens.start] + [tokens.pad] * latent_size + [tokens.end]
    ids: list[int] = []
    for index, piece in enumerate(text.split(LATENT_MARK)):
        ids += (block if index else []) + tokenizer.encode(piece, add_special_tokens=False)
    return ids + [tokens.eos]


def collate(items: list[dict], tokenizer, tokens, latent_size: int) -> dict:
    import torch  # here, not at the top: `python -m RL.sft` refuses a bad config before torch loads

    from RL.latent_sft_loss import sft_labels
    from RL.protocol import left_pad, left_pad_mask

    rows = [torch.cat([item["input_ids"], torch.tensor(response_ids(tokenizer, tokens, item, latent_size))])
            for item in items]
    input_ids = left_pad(rows, tokens.pad_token)
    width = input_ids.shape[1]
    lengths = torch.tensor([len(row) for row in rows])
    attention_mask = left_pad_mask(lengths, width)
    prompt_ends = width - lengths + torch.tensor([len(item["input_ids"]) for item in items])
    pixels = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
    grids = [item["image_grid_thw"] for item in items if item.get("image_grid_thw") is not None]
    return {
        "input_ids": input_ids, "attention_mask": attention_mask,
        "labels": sft_labels(input_ids, prompt_ends, attention_mask, tokens),
        "pixel_values": torch.cat(pixels) if pixels else None, "image_grid_thw": torch.cat(grids) if grids else None,
    }


def run_sft(config) -> Path:
    import torch  # here, not at the top: `python -m RL.sft` refuses a bad config before torch loads
    from tqdm import tqdm

    from RL.data import RLPromptDataset
    from RL.latent_sft_loss import latent_sft_loss
    from monet_models.transformers import load_latent_model

    sft = config.sft
    torch.manual_seed(sft.seed)
    model, processor = load_latent_model(config.worker.actor.model.model_path, dtype="fp32")
    tokens, latent_size = model.latent_tokens, config.worker.rollout.latent_size
    dataset = RLPromptDataset(sft.train_files or config.data.train_files, processor, config.data)
    if sft.freeze_vision_tower:
        model.model.visual.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=sft.lr, weight_decay=sft.weight_decay)
    order = random.Random(sft.seed)
    model.train()
    bar = tqdm(range(sft.steps), desc="latent SFT", dynamic_ncols=True)
    for step in bar:
        items = [dataset[order.randrange(len(dataset))] for _ in range(sft.batch_size)]
        batch = collate(items, processor.tokenizer, tokens, latent_size)
        for group in optimizer.param_groups:
            group["lr"] = sft.lr * min(1.0, (step + 1) / max(1, sft.warmup_steps))
        loss = latent_sft_loss(model, **batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, sft.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    out = Path(sft.output_dir or Path(config.trainer.run_dir) / "sft_model")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"latent SFT model written to {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    run_sft(load_config(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    run_cli(main, ConfigError)
