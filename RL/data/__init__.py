"""Data: the RL prompt dataset, its resumable loader, and the unlabeled image pool."""
from RL.data.image_pool import ImagePool, PoolImage
from RL.data.images import fit_pixels, load_image
from RL.data.loader import StatefulPromptLoader, build_loader
from RL.data.format_prompt import FormatPrompt, build_messages, render_prompt
from RL.data.rl_dataset import SKIP_REASONS, DatasetOptions, RLPromptDataset, build_datasets

__all__ = [
    "ImagePool", "PoolImage", "RLPromptDataset", "SKIP_REASONS", "StatefulPromptLoader",
    "DatasetOptions", "FormatPrompt", "build_datasets", "build_loader", "build_messages", "fit_pixels", "load_image", "render_prompt",
]
