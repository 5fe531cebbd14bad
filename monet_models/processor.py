"""Processor loading that works with and without torchvision.

Without torchvision (every CPU machine: the matching torchvision wheel is CUDA-linked) transformers cannot build a
video processor, and `Qwen2_5_VLProcessor(video_processor=None)` fails. `ImageOnlyQwen2_5_VLProcessor` is the
same processor with the video half left out; it is registered for Qwen2.5-VL configs so `AutoProcessor` finds it.
"""
from __future__ import annotations

from transformers import AutoProcessor, PreTrainedTokenizerBase, Qwen2_5_VLConfig
from transformers.processing_utils import ProcessorMixin
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images and text only (videos are out of scope for this project)."""

    # transformers derives the sub-processors from this signature, so `video_processor` is deliberately absent.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def register_processor() -> None:
    AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)


def load_processor(path: str):
    """Load the image+text processor of a model folder; fail loudly instead of returning a bare tokenizer."""
    register_processor()
    processor = AutoProcessor.from_pretrained(path)
    if isinstance(processor, PreTrainedTokenizerBase) or not hasattr(processor, "image_processor"):
        raise RuntimeError(f"{path}: AutoProcessor returned no image processor; is this a Qwen2.5-VL model folder?")
    return processor


register_processor()  # importing this module is what makes AutoProcessor find the image-only processor
