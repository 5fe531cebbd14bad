"""Processor loading that works with and without torchvision.

Without torchvision (every CPU machine: the matching torchvision wheel is CUDA-linked) transformers cannot build a
video processor, and `Qwen2_5_VLProcessor(video_processor=None)` fails. `ImageOnlyQwen2_5_VLProcessor` is the
same processor with the video half left out; it is registered for Qwen2.5-VL configs so `AutoProcessor` finds it.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoProcessor, PreTrainedTokenizerBase, Qwen2_5_VLConfig
from transformers.processing_utils import ProcessorMixin
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

from common.model_folder import ModelFolderError  # stdlib-only: the error class entry points report in one line


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images and text only (videos are out of scope for this project)."""

    # transformers derives the sub-processors from this signature, so `video_processor` is deliberately absent.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also write video_preprocessor_config.json: vLLM builds the stock processor, which needs one. It is written
        as JSON because constructing a video processor needs torchvision, which CPU machines cannot import."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        path = Path(save_directory) / "video_preprocessor_config.json"
        if not path.exists():
            path.write_text(json.dumps(video_processor_config(self.image_processor), indent=2) + "\n")
        return result


def video_processor_config(image_processor) -> dict:
    """The Qwen2-VL video processor settings matching an image processor (same patching and normalisation)."""
    size = image_processor.size  # {"shortest_edge": min pixels, "longest_edge": max pixels} in transformers 5
    return {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True, "do_sample_frames": False,
        "image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std),
        "rescale_factor": image_processor.rescale_factor, "resample": 3,
        "patch_size": image_processor.patch_size, "merge_size": image_processor.merge_size,
        "temporal_patch_size": image_processor.temporal_patch_size,
        "size": {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]},
        "min_frames": 4, "max_frames": 768,
    }


def register_processor() -> None:
    AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)


def load_processor(path: str):
    """Load the image+text processor of a model folder; fail loudly instead of returning a bare tokenizer."""
    register_processor()
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:  # no such folder, no processor files, "Unrecognized processing class"
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise ModelFolderError(f"{path}: cannot load its processor ({reason}); is this a Qwen2.5-VL model folder "
                               "with its processor and tokenizer files?") from error
    if isinstance(processor, PreTrainedTokenizerBase) or not hasattr(processor, "image_processor"):
        raise ModelFolderError(f"{path}: it holds no image processor (preprocessor_config.json); is this a "
                               "Qwen2.5-VL model folder?")
    return processor


register_processor()  # importing this module is what makes AutoProcessor find the image-only processor
