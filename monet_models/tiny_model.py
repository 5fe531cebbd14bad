"""A tiny, randomly initialised Qwen2.5-VL built fully offline (tokenizer, processor, model) in seconds: the model
of the tests, the embedded examples and the benchmarks (`python -m tools.make_tiny_model` writes one), and
`random_model`, the same tokenizer with a random text model of any size (`tools.bench_*`).

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


def build_config(tokenizer) -> Qwen2_5_VLConfig:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    vocab = (len(tokenizer) + 63) // 64 * 64
    text = dict(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
    )
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=56, out_hidden_size=128, fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )


def build_tiny_model(out_dir: str | Path, task_text: list[str], seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL (config, safetensors weights, tokenizer, processor) to `out_dir`. `task_text` is text
    of the task it will learn (the toy task's `RL.toy_task.corpus_lines()`): passed in, because the task lives in
    the driver layer above this one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed, task_text)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=2,
    )
    processor = ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(build_config(tokenizer)).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


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
