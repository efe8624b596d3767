"""One vLLM engine per training process, for the whole run (deleting an engine destroys the
default process group), started through torchrun's environment
(``distributed_executor_backend="external_launcher"``): rollout TP is independent of training
TP (rollout TP=1 gives every rank its own engine: data-parallel generation).

Sleep mode (CUDA only; vLLM-CPU has none) frees the engine's GPU memory while Megatron trains.
Each step runs: ``generate`` -> ``sleep`` -> training -> ``push_weights`` -> ``generate``.

- Level 2 (the default): vLLM discards the weights and the KV cache instead of copying the
  weights to pinned host memory and back (level 1) only for the push to overwrite them.
  ``push_weights`` wakes the weights alone, reloads them and drops the prefix cache; the KV
  cache is woken by the next ``generate``, so the reload runs without it resident.
- Level 1: the weights are offloaded to host memory; ``push_weights`` wakes everything first.

What level 2 discards and the push does not rewrite: the model's buffers (rotary cos/sin
caches, allocated at load in the "weights" memory pool). vLLM keeps them itself: upstream
``vllm/v1/worker/gpu_worker.py`` ``Worker.sleep(level=2)`` copies every
``model.named_buffers()`` to the CPU (``_sleep_saved_buffers``) and ``Worker.wake_up`` copies
them back when ``"weights"`` is among the tags woken (vLLM 0.32.0; in the older
``vllm-project/vllm`` snapshot 35d5cda1 the restore runs on every wake, which the order here,
weights first, also satisfies). The layer-wise reload then
puts those restored buffers back unchanged on rotary layers (upstream
``vllm/model_executor/model_loader/reload/layerwise.py`` ``finalize_layerwise_processing`` ->
``_place_kernel_tensors``). So nothing here copies buffers; :meth:`RolloutEngine.prompt_logprobs`
lets a GPU check show that log-probs are unchanged after a push of unchanged weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from megatron_cegppo.config.schema import ModelConfig, RolloutConfig
from megatron_cegppo.config.validate import setting_problem
from megatron_cegppo.platform import current_platform
from megatron_cegppo.rollout.vllm_compat import (
    quiet_buffer_only_reload_warnings,
    share_run_id,
    unique_cpu_shm_names,
)

SLEEP_LEVELS = (1, 2)
# vLLM's tags of the memory pools sleep mode frees (vllm/v1/executor/abstract.py SLEEP_TAGS)
WEIGHTS, KV_CACHE = "weights", "kv_cache"
# the run config's defaults (config.schema), so an engine built without a config behaves as one
# built from the default config
_ROLLOUT = RolloutConfig()


@dataclass(frozen=True)
class SamplingConfig:
    n: int = _ROLLOUT.n
    temperature: float = _ROLLOUT.temperature
    top_p: float = _ROLLOUT.top_p
    max_tokens: int = _ROLLOUT.max_tokens
    stop: tuple[str, ...] = tuple(_ROLLOUT.stop)

    @classmethod
    def from_rollout(cls, rollout: RolloutConfig, **changes) -> "SamplingConfig":
        """The run config's ``rollout`` sampling settings, with ``changes`` (validation's and
        eval's own temperature, samples per prompt, ...)."""
        settings = dict(n=rollout.n, temperature=rollout.temperature, top_p=rollout.top_p,
                        max_tokens=rollout.max_tokens, stop=tuple(rollout.stop))
        return cls(**{**settings, **changes})

    def __post_init__(self) -> None:
        # the ranges the run config's rollout settings are held to (config.validate)
        found = [setting_problem(f"rollout.{name}", getattr(self, name))
                 for name in ("n", "temperature", "top_p", "max_tokens")]
        found = [problem for problem in found if problem]
        if found:
            raise ValueError("; ".join(found))


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
    tensor_parallel_size: int = _ROLLOUT.tensor_parallel
    dtype: str = ModelConfig().dtype
    max_model_len: int = _ROLLOUT.max_model_len
    kv_cache_bytes: int = _ROLLOUT.kv_cache_bytes  # CPU: the KV cache's size
    # GPU: vLLM's share of the device while generating
    gpu_memory_utilization: float = _ROLLOUT.gpu_memory_utilization
    enable_sleep_mode: Optional[bool] = None  # None: on where supported (CUDA)
    extra: dict = field(default_factory=dict)  # passed to vllm.LLM as they are
    # 2: weights discarded while asleep (every push rewrites them); 1: offloaded to host memory
    sleep_level: int = 2
    # "dummy": the engine starts with random weights and takes the trainer's first push (the
    # HF folder's weights are read once, by the trainer's sliced load); "auto": from the folder
    load_format: str = "auto"

    def __post_init__(self) -> None:
        if self.sleep_level not in SLEEP_LEVELS:
            raise ValueError(f"sleep_level must be one of {list(SLEEP_LEVELS)}, got {self.sleep_level}")


class RolloutEngine:
    def __init__(self, model_path: str, config: EngineConfig, *, seed: int = 0, skip_tokenizer_init: bool = False):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        on_gpu = current_platform().is_cuda
        if not on_gpu:
            share_run_id()
            unique_cpu_shm_names()
        quiet_buffer_only_reload_warnings()
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
            logprobs_mode="processed_logprobs", load_format=config.load_format, **memory, **config.extra,
        )
        self._sleeping: set[str] = set()  # the tags vLLM holds asleep
        self._weights_discarded = False  # a level-2 sleep since the last push

    @property
    def asleep(self) -> bool:
        """Whether any of the engine's GPU memory (weights or KV cache) is still released."""
        return bool(self._sleeping)

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

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        """The engine's log-probability of every prompt token after the first, given the tokens
        before it (temperature 1): ``len(p) - 1`` values per prompt. A check that weights
        survive sleep and push compares these before and after pushing unchanged weights."""
        from vllm import SamplingParams

        self.wake_up()
        params = SamplingParams(max_tokens=1, temperature=1.0, seed=0, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        result = []
        for prompt, output in zip(prompts, outputs):
            steps = list(output.prompt_logprobs or [])[1:]  # the first token has no log-prob
            result.append([float(step[tok].logprob) for step, tok in zip(steps, list(prompt)[1:])])
        return result

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads new weights (HF names, full tensors, streamed) and drops the prefix cache,
        whose blocks were computed with the old weights. After a level-2 sleep only the weights
        are woken (vLLM restores the model's buffers with them, see the module docstring); the
        KV cache stays released until the next :meth:`generate`."""
        if self._sleeping:
            self._wake([WEIGHTS] if self._weights_discarded else None)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        self._weights_discarded = False
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Frees the engine's GPU memory for training (a no-op without sleep mode). At level 2
        the weights are discarded: :meth:`push_weights` must run before the next generation."""
        if not self.sleep_mode or WEIGHTS in self._sleeping:
            return
        level = self.config.sleep_level
        self.llm.sleep(level=level)
        self._sleeping = {WEIGHTS, KV_CACHE}
        self._weights_discarded = level == 2

    def wake_up(self) -> None:
        """Makes all of the engine's memory resident again (vLLM's scheduler stays paused
        until every tag is awake)."""
        if not self._sleeping:
            return
        if self._weights_discarded:
            raise RuntimeError(
                "the engine slept at level 2, which discards its weights: push_weights() before "
                "generating (or set EngineConfig.sleep_level=1)")
        self._wake(None)

    def _wake(self, tags: Optional[list[str]]) -> None:
        """Wakes ``tags`` (``None``: whatever still sleeps, with the tags named where only some
        sleep, so vLLM wakes exactly those)."""
        if tags is None:
            if self._sleeping == {WEIGHTS, KV_CACHE}:
                self.llm.wake_up()
            else:
                self.llm.wake_up(tags=sorted(self._sleeping))
            self._sleeping.clear()
            return
        tags = [t for t in tags if t in self._sleeping]
        if tags:
            self.llm.wake_up(tags=tags)
            self._sleeping.difference_update(tags)
