"""Prompt datasets and the resumable order they are drawn in."""

from .prompts import SUPPORTED_EXTENSIONS, apply_chat_template, load_prompts
from .sampler import ShuffledSampler

__all__ = ["SUPPORTED_EXTENSIONS", "apply_chat_template", "load_prompts", "ShuffledSampler"]
