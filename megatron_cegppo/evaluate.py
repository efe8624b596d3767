"""Accuracy avg@k of a model on a prompt file: k samples per prompt with vLLM, each scored
with the config's reward (math-verify for math data), averaged (:mod:`megatron_cegppo.validation`)."""

from __future__ import annotations

from dataclasses import replace

from megatron_cegppo.config import Config


def input_problems(cfg: Config, data_path: str) -> list[str]:
    """Every problem of the files eval reads, found before anything heavy is imported: its
    prompt file ``data_path`` (checked as a training file is), the model folder, the reward.
    The config's training file and run directory are not eval's: neither is checked."""
    from megatron_cegppo.preflight import model_folder_problems, prompt_file_problems, reward_problems

    # the prompt checks read the path and the keys from a DataConfig: a copy names the eval file
    prompts = prompt_file_problems(replace(cfg.data, train_path=data_path))
    return prompts + model_folder_problems(cfg.model.path) + reward_problems(cfg.reward.name)


def evaluate(cfg: Config, data_path: str, *, k: int = 8) -> dict:
    """avg@k (``accuracy``: the mean over problems of each one's fraction of correct samples,
    a problem repeated in the file counting once) and pass@k of ``data_path``, with the
    samples, their rewards and rows; the run's in-training validation computes the same."""
    from megatron_cegppo.validation import evaluate_file

    return evaluate_file(cfg, data_path, k=k)
