"""One vLLM engine per training process, for the whole run (deleting an engine destroys the
default process group), started through torchrun's environment
(``distributed_executor_backend="external_launcher"``): rollout TP is independent of training
TP (rollout TP=1 gives every rank its own engine: data-parallel generation)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import torch

from megatron_cegppo.rollout.vllm_compat import share_run_id, unique_cpu_shm_names


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError("n and max_tokens must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    """One sampled response and the log-probability vLLM gave each of its tokens (under the
    sampling distribution: temperature and top-p applied)."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    text: str = ""
    finish_reason: Optional[str] = None


@dataclass(frozen=True)
class EngineConfig:
    tensor_parallel_size: int = 1
    dtype: str = "float32"
    max_model_len: int = 512
    kv_cache_bytes: int = 256 << 20  # CPU: the KV cache's size
    gpu_memory_utilization: float = 0.5  # GPU: vLLM's share of the device while generating
    enable_sleep_mode: Optional[bool] = None  # None: on where supported (CUDA)
    extra: dict = field(default_factory=dict)  # passed to vllm.LLM as they are


class RolloutEngine:
    def __init__(self, model_path: str, config: EngineConfig, *, seed: int = 0, skip_tokenizer_init: bool = False):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            share_run_id()
            unique_cpu_shm_names()
        from vllm import LLM

        self.config = config
        self.sleep_mode = on_gpu if config.enable_sleep_mode is None else config.enable_sleep_mode
        if self.sleep_mode and not on_gpu:
            raise ValueError("vLLM's sleep mode needs CUDA")
        memory = (
            dict(gpu_memory_utilization=config.gpu_memory_utilization, enable_sleep_mode=self.sleep_mode)
            if on_gpu else dict(kv_cache_memory_bytes=config.kv_cache_bytes)
        )
        self.llm = LLM(
            model=model_path, dtype=config.dtype, tensor_parallel_size=config.tensor_parallel_size,
            distributed_executor_backend="external_launcher", max_model_len=config.max_model_len,
            seed=seed, enforce_eager=not on_gpu, skip_tokenizer_init=skip_tokenizer_init,
            logprobs_mode="processed_logprobs", **memory, **config.extra,
        )
        self.asleep = False

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, seeds: Sequence[int]) -> list[Completion]:
        """``sampling.n`` completions per prompt (token ids). ``seeds[i]`` seeds prompt i's
        samples: ranks of one rollout-TP group must pass the same seeds, or they would sample
        different tokens without any error."""
        from vllm import SamplingParams

        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        self.wake_up()
        params = [
            SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                           max_tokens=sampling.max_tokens, stop=list(sampling.stop) or None,
                           seed=int(seed), logprobs=0)
            for seed in seeds
        ]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        completions = []
        for index, output in enumerate(outputs):
            for c in output.outputs:
                ids = list(c.token_ids)
                lps = [step[tok].logprob for step, tok in zip(c.logprobs, ids)]
                completions.append(Completion(index, ids, lps, c.text or "", c.finish_reason))
        return completions

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads new weights (HF names, full tensors, streamed) and drops the prefix cache,
        whose blocks were computed with the old weights."""
        self.wake_up()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Frees the engine's GPU memory for training (weights offloaded, KV cache dropped)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


