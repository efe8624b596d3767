"""The CPU learning demo: a character tokenizer for the arithmetic task and a tiny Qwen2
policy warmed up to a partly-correct starting checkpoint for RL."""

from .tokenizer import BOXED, load_task_tokenizer, train_task_tokenizer

__all__ = ["BOXED", "train_task_tokenizer", "load_task_tokenizer"]
