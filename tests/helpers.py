"""Small builders shared by tests: chat prompts with images for the tiny model."""
from __future__ import annotations

from PIL import Image


def coloured_image(rgb=(200, 30, 30), size=56) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def encode_prompts(processor, questions, images):
    """Left-padded processor outputs for one image + question per prompt."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
        )
        for question in questions
    ]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)
