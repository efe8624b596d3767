"""Accuracy avg@k of a model on a prompt file: k samples per prompt with vLLM, each scored
with the config's reward (math-verify for math data), averaged."""

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
    import numpy as np
    from transformers import AutoTokenizer

    from megatron_cegppo.data.prompts import load_prompts, tokenize_prompts
    from megatron_cegppo.rewards.registry import compute_rewards
    from megatron_cegppo.rollout import EngineConfig, RolloutEngine, SamplingConfig

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    records = load_prompts(data_path, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key)
    # over-long prompts are refused or cut here, as in training, not by vLLM mid-run
    fitted = tokenize_prompts(tokenizer, records, cfg, source=data_path)
    if fitted.message:
        print(f"[megatron-cegppo] {fitted.message}", flush=True)
    prompts = fitted.token_ids
    r = cfg.rollout
    engine = RolloutEngine(cfg.model.path, EngineConfig(
        tensor_parallel_size=1, dtype=cfg.model.dtype, max_model_len=r.max_model_len,
        kv_cache_bytes=r.kv_cache_bytes, gpu_memory_utilization=r.gpu_memory_utilization), seed=cfg.trainer.seed)
    sampling = SamplingConfig(n=k, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, stop=tuple(r.stop))
    completions = engine.generate(prompts, sampling, seeds=[cfg.trainer.seed + i for i in range(len(prompts))])
    answers = [records[c.prompt_index]["answer"] for c in completions]
    rewards = compute_rewards(cfg.reward.name, [c.text for c in completions], answers)
    return {"accuracy": float(np.mean(rewards)), "prompts": len(records), "k": k,
            "truncated_prompts": fitted.truncated, "responses": [c.text for c in completions], "rewards": rewards,
            "prompt_index": [c.prompt_index for c in completions]}
