"""A tiny, randomly initialised Qwen2.5-VL built fully offline (tokenizer, processor, model) in seconds: the model
of the tests, the embedded examples and the benchmarks (`python -m tools.make_tiny_model` writes one), and
`random_model`, the same tokenizer with a random text model of any size (`tools.bench_*`).

`shape="3b"` / `"7b"` builds a probe instead: every width of the released Qwen2.5-VL-3B / -7B (text and vision,
the full vocabulary) with only `layers` decoder layers and vision blocks, so every tensor shape but the depth is the
real one (`tools.bench_scale` measures memory and weight sync on it; docs/scale.md).

The tokenizer is a byte-level BPE trained here on synthetic text (random words, printable ASCII and the task's text),
with the Qwen2.5-VL chat template, the vision tokens and the three latent tokens. Token ids differ from real Qwen
checkpoints on purpose: code must look them up by string.
"""
from __future__ import annotations

import random
import string
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from common.atomic import umask_permissions
from monet_models.latent_tokens import LATENT_END, LATENT_PAD, LATENT_START, LatentTokens
from monet_models.processor import ImageOnlyQwen2_5_VLProcessor, load_processor
from monet_models.transformers import LatentQwen2_5_VLForConditionalGeneration

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", LATENT_START, LATENT_END, LATENT_PAD, "<observation>", "</observation>",
]
VOCAB_SIZE = 2048
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 16 * 28 * 28

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def synthetic_corpus(rng: random.Random, task_text: list[str], lines: int = 3000) -> list[str]:
    """Random words and printable ASCII (so any text tokenizes), plus the task's own text often enough that its words
    get compact tokens."""
    letters = string.ascii_lowercase
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(800)]
    corpus = ["".join(rng.choice(string.printable[:95]) for _ in range(60)) for _ in range(lines // 10)]
    corpus += [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(lines)]
    corpus += list(task_text) * 50
    corpus += ["You are a helpful assistant. First think, then put the final answer in \\boxed{}."] * 50
    return corpus


def build_tokenizer(seed: int, task_text: list[str]) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(synthetic_corpus(random.Random(seed), task_text), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens=[token for token in SPECIAL_TOKENS if token not in ("<|endoftext|>", "<|im_end|>")],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class RealWidths:
    """Every width of a released Qwen2.5-VL, all but its depth (its config.json; docs/scale.md gives the sources)."""
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # tie_word_embeddings: 3B shares the input and output embedding, 7B does not
    real_layers: int  # the released depth, for reference (the probe builds `layers`)
    vision_hidden: int = 1280
    vision_intermediate: int = 3420
    vision_heads: int = 16
    vision_depth: int = 32
    window_size: int = 112
    max_positions: int = 128000


# Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct config.json; the vision tower is the same in both (out_hidden = hidden).
REAL_WIDTHS = {
    "3b": RealWidths(hidden=2048, intermediate=11008, heads=16, kv_heads=2, vocab=151936, tied=True, real_layers=36),
    "7b": RealWidths(hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064, tied=False, real_layers=28),
}
SHAPES = ("tiny", *REAL_WIDTHS)


def released_config(shape: str, layers: int | None = None) -> dict:
    """The size fields of the released model's config.json (`layers` defaults to its real depth, and so does the
    vision tower's): what a memory plan reads when there is no model folder at hand (`tools.plan_memory --shape`)."""
    real = REAL_WIDTHS[shape]
    return {
        "tie_word_embeddings": real.tied,
        "text_config": {"hidden_size": real.hidden, "intermediate_size": real.intermediate,
                        "num_hidden_layers": layers or real.real_layers, "num_attention_heads": real.heads,
                        "num_key_value_heads": real.kv_heads, "vocab_size": real.vocab},
        "vision_config": {"depth": layers or real.vision_depth, "hidden_size": real.vision_hidden,
                          "intermediate_size": real.vision_intermediate, "num_heads": real.vision_heads,
                          "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
                          "out_hidden_size": real.hidden},
    }


def build_config(tokenizer, shape: str = "tiny", layers: int | None = None) -> Qwen2_5_VLConfig:
    """The tiny model's config, or with `shape` "3b"/"7b" the released model's widths at `layers` depth (default:
    2 layers and 2 vision blocks either way)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    depth = layers or 2
    vocab = (len(tokenizer) + 63) // 64 * 64
    text = dict(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=depth, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
    )
    vision = dict(
        depth=depth, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=56, out_hidden_size=128, fullatt_block_indexes=[depth - 1],
    )
    tied = shape != "tiny" and _use_real_widths(shape, text, vision, depth, len(tokenizer))
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tied,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )


def _use_real_widths(shape: str, text: dict, vision: dict, depth: int, tokens: int) -> bool:
    """Set the released model's widths in the text and vision settings; returns whether it ties its embeddings."""
    real = REAL_WIDTHS[shape]
    if real.vocab < tokens:
        raise ValueError(f"the tokenizer's {tokens} tokens do not fit the {shape} vocabulary {real.vocab}")
    text.update(vocab_size=real.vocab, hidden_size=real.hidden, intermediate_size=real.intermediate,
                num_attention_heads=real.heads, num_key_value_heads=real.kv_heads,
                max_position_embeddings=real.max_positions)
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [16, 24, 24]}  # head size 128
    vision.update(hidden_size=real.vision_hidden, intermediate_size=real.vision_intermediate,
                  num_heads=real.vision_heads, window_size=real.window_size, out_hidden_size=real.hidden,
                  fullatt_block_indexes=_full_attention_blocks(depth, real.vision_depth), tokens_per_second=2)
    return real.tied


def _full_attention_blocks(depth: int, real_depth: int) -> list[int]:
    """The released towers run every 8th block with full attention (7, 15, 23, 31 of 32), the rest in windows; a
    shallower probe keeps that rhythm and always has one full-attention block (its last), so both kinds run."""
    period = real_depth // 4
    return [index for index in range(depth) if index % period == period - 1] or [depth - 1]


def build_tiny_model(out_dir: str | Path, task_text: list[str], seed: int = 0, shape: str = "tiny",
                     layers: int | None = None) -> Path:
    """Write a tiny Qwen2.5-VL (config, safetensors weights, tokenizer, processor) to `out_dir`. `task_text` is text
    of the task it will learn (the toy task's `RL.toy_task.corpus_lines()`): passed in, because the task lives in
    the driver layer above this one. `shape` "3b"/"7b" writes the real-width probe instead (`build_config`), in
    bf16 with a cheap random init."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed, task_text)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=2,
    )
    processor = ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = build_config(tokenizer, shape, layers)
    if shape == "tiny":
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    else:
        model = _cheap_random_model(config, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    umask_permissions(out)  # safetensors writes its file 0600
    return out


def _cheap_random_model(config: Qwen2_5_VLConfig, seed: int):
    """A bf16 model at real widths without transformers' fp32 init (a minute and gigabytes at 150k x 3584): built
    on the meta device, given storage, then unit norms, zero biases and matrices filled from one pool of
    normal(0, initializer_range) values, each from its own random offset. The pool's length is prime, so no row of
    any matrix repeats another; the weights only need to be random-looking, not independent."""
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    pool = torch.empty(POOL_SIZE).normal_(0.0, config.get_text_config().initializer_range, generator=generator)
    pool = torch.cat([pool, pool]).to(torch.bfloat16)  # any window of POOL_SIZE values starting in the first half
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:  # RMSNorm weights
                param.fill_(1.0)
            else:
                _fill_from_pool(param.view(-1), pool, int(torch.randint(POOL_SIZE, (1,), generator=generator)))
    if config.tie_word_embeddings:
        model.tie_weights()  # to_empty gave the shared embedding two storages
    return model.eval()


POOL_SIZE = 4_194_301  # a prime near 2**22


def _fill_from_pool(flat: torch.Tensor, pool: torch.Tensor, offset: int) -> None:
    for start in range(0, flat.numel(), POOL_SIZE):
        size = min(POOL_SIZE, flat.numel() - start)
        flat[start:start + size].copy_(pool[offset:offset + size])


@dataclass(frozen=True)
class ModelShape:
    """Sizes of the random text model the benchmarks time (vision stays tiny); the defaults are the tiny model's."""
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vocab: int | None = field(default=None, metadata={"help": "logits width (default: the tiny tokenizer's)"})

    @staticmethod
    def add_arguments(parser) -> None:
        """`--hidden`, `--layers`, ... on a benchmark's command line, one per field."""
        for size in fields(ModelShape):
            parser.add_argument(f"--{size.name.replace('_', '-')}", type=int, default=size.default,
                                help=size.metadata.get("help"))

    @classmethod
    def from_args(cls, args) -> "ModelShape":
        return cls(**{size.name: getattr(args, size.name) for size in fields(cls)})


def random_model(shape: ModelShape, task_text: list[str], seed: int, device: str, dtype: torch.dtype):
    """(model, processor): the tiny tokenizer and processor with a random latent text model of `shape`."""
    with tempfile.TemporaryDirectory(prefix="random_model_") as folder:
        processor = load_processor(str(build_tiny_model(folder, task_text, seed=seed)))
    config = build_config(processor.tokenizer)
    text = config.text_config
    head_dim = shape.hidden // shape.heads
    quarter = head_dim // 2 // 4
    text.hidden_size, text.num_hidden_layers, text.intermediate_size = shape.hidden, shape.layers, shape.intermediate
    text.num_attention_heads, text.num_key_value_heads = shape.heads, shape.kv_heads
    text.head_dim = head_dim
    text.layer_types = ["full_attention"] * shape.layers
    text.rope_parameters["mrope_section"] = [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2]
    text.vocab_size = shape.vocab or text.vocab_size
    config.vision_config.out_hidden_size = shape.hidden
    torch.manual_seed(seed)
    with torch.device(device):
        model = LatentQwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.set_latent_tokens(LatentTokens.from_tokenizer(processor.tokenizer))
    return model.eval(), processor
