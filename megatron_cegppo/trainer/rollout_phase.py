"""One step's generation: prompts spread over the vLLM engines, rewards, DAPO dynamic
sampling, and the groups gathered on every rank."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_cegppo.algorithms.advantages import group_all_equal
from megatron_cegppo.algorithms.dynamic_sampling import DynamicSampler
from megatron_cegppo.config.schema import ModelConfig, RolloutConfig
from megatron_cegppo.platform import current_platform
from megatron_cegppo.rewards.registry import compute_rewards
from megatron_cegppo.rollout.engine import Completion, EngineConfig, RolloutEngine, SamplingConfig
from megatron_cegppo.rollout.exchange import SampledGroup, share_groups


@dataclass
class Group:
    """One prompt and its sampled responses."""

    prompt_index: int
    prompt_ids: list[int]
    completions: list[Completion]
    rewards: list[float]
    # the responses' texts: only on the ranks whose engine generated them (they do not travel
    # between ranks; rewards are computed before the exchange)
    texts: list[str] = field(default_factory=list)


def start_engine(model: ModelConfig, rollout: RolloutConfig, *, seed: int) -> RolloutEngine:
    """This rank's vLLM engine, started without the folder's weights: they come from the
    trainer's first push (the starting or the resumed ones)."""
    return RolloutEngine(model.path, EngineConfig(
        tensor_parallel_size=rollout.tensor_parallel, dtype=model.dtype, max_model_len=rollout.max_model_len,
        kv_cache_bytes=rollout.kv_cache_bytes, gpu_memory_utilization=rollout.gpu_memory_utilization,
        load_format="dummy"), seed=seed)


def request_seed(seed: int, step: int, round_: int, prompt_index: int) -> int:
    """The same on every rank (engines of one rollout-TP group must sample alike) and new
    for every step, round and prompt."""
    return zlib.crc32(f"{seed}/{step}/{round_}/{prompt_index}".encode()) & 0x7FFFFFFF


class RolloutPhase:
    def __init__(self, engine: RolloutEngine, layout, prompts: Sequence[dict], *, reward: str,
                 sampling: SamplingConfig, seed: int):
        self.engine, self.layout, self.prompts = engine, layout, prompts
        self.reward, self.sampling, self.seed = reward, sampling, seed

    def _generate(self, indices: list[int], step: int, round_: int) -> list[Group]:
        """Generates for the prompts of this rank's engine; returns every engine's groups,
        in the order of ``indices``, on every rank."""
        L = self.layout
        mine = indices[L.rollout_group::L.rollout_groups]
        completions = self.engine.generate(
            [self.prompts[i]["token_ids"] for i in mine], self.sampling,
            [request_seed(self.seed, step, round_, i) for i in mine],
        ) if mine else []
        by_position: list[list[Completion]] = [[] for _ in mine]
        for c in completions:
            by_position[c.prompt_index].append(c)
        groups = []
        for index, cs in zip(mine, by_position):
            for c in cs:  # engine-local position -> index into the prompt list
                c.prompt_index = index
            texts = [c.text for c in cs]
            rewards = compute_rewards(self.reward, texts, [self.prompts[index]["answer"]] * len(cs))
            groups.append(Group(index, list(self.prompts[index]["token_ids"]), cs, rewards, texts))
        if dist.is_initialized() and L.world > 1:
            groups = self._share(groups, L.rollout_leader)
        by_index = {g.prompt_index: g for g in groups}
        return [by_index[i] for i in indices]

    def _share(self, groups: list[Group], send: bool) -> list[Group]:
        """Every engine's groups on every rank, as flat tensors (the leaders' groups travel;
        texts do not: they are kept only for the groups this rank's engine generated)."""
        local_texts = {g.prompt_index: g.texts for g in groups}
        shared = share_groups([SampledGroup(g.prompt_index, g.completions, g.rewards) for g in groups],
                              send=send, device=current_platform().device)
        result = []
        for s in shared:
            texts = local_texts.get(s.prompt_index, [])
            if len(texts) == len(s.completions):
                for c, text in zip(s.completions, texts):
                    c.text = text
            else:
                texts = []
            result.append(Group(s.prompt_index, list(self.prompts[s.prompt_index]["token_ids"]),
                                s.completions, s.rewards, list(texts)))
        return result

    def collect(self, sampler, *, step: int, num_prompts: int, dynamic: bool, max_rounds: int,
                per_round: Optional[int] = None, shrink_to: Optional[int] = None):
        """``num_prompts`` groups for training, the rewards of every response sampled, and
        sampling statistics. With dynamic sampling, ``per_round`` prompts (default
        ``num_prompts``) are generated per round and groups whose rewards are all equal are
        dropped, for up to ``max_rounds`` rounds; a batch still short then is filled with
        such groups (they add no gradient: their advantages are 0), or, with ``shrink_to``
        (groups per mini-batch), cut to whole mini-batches of the kept groups (one mini-batch
        filled when fewer are kept)."""
        seen: list[float] = []  # every sampled response's reward: the policy's accuracy
        if not dynamic:
            groups = self._generate(sampler.next_batch(num_prompts), step, 0)
            seen = [r for g in groups for r in g.rewards]
            return groups, seen, {"sampling/rounds": 1, "sampling/kept_frac": 1.0}
        dropped: list[Group] = []
        rounds = [0]

        def generate(n: int):
            groups = self._generate(sampler.next_batch(n), step, rounds[0])
            rounds[0] += 1
            seen.extend(r for g in groups for r in g.rewards)
            rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
            # the sampler's own test on the same tensor: a group it drops is kept as filler
            equal = group_all_equal(rewards, self.sampling.n).tolist()
            dropped.extend(g for g, same in zip(groups, equal) if same)
            return groups, rewards

        result = DynamicSampler(generate, target_groups=num_prompts, group_size=self.sampling.n,
                                max_rounds=max_rounds, groups_per_round=per_round or num_prompts).sample()
        kept = list(result.records)
        if shrink_to is None:
            groups = kept + dropped[: result.shortfall]
        elif len(kept) < shrink_to:
            groups = kept + dropped[: shrink_to - len(kept)]
        else:
            groups = kept[: len(kept) // shrink_to * shrink_to]
        stats = {
            "sampling/rounds": result.rounds,
            "sampling/kept_frac": result.kept_groups / max(1, result.generated_groups),
            "sampling/filled_groups": max(0, len(groups) - len(kept)),
            "sampling/trained_groups": len(groups),
        }
        return groups, seen, stats
