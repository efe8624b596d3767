"""The rollout phase shares every engine's groups with every rank as tensors: in real gloo
processes, each rank gets exactly the groups the former ``all_gather_object`` of whole Group
objects gave (the same groups in the order asked, token ids, float32 log-probs, rewards,
finish reasons and prompt indices), with no object collective called.

The engine is a fake (what is tested is the exchange): its completions depend only on the
prompt and its seed, as vLLM's seeded requests do, with lengths from 0 to a few thousand
tokens."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from megatron_cegppo.rewards.registry import compute_rewards, register_reward
from megatron_cegppo.rollout.engine import Completion, SamplingConfig
from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed

REASONS = ["stop", "length", None, "abort"]


@register_reward("test_share_text")
def text_reward(response: str, answer: str) -> float:
    """Depends on the text, which only the generating rank has."""
    return len(response) % 7 / 7 + float(answer in response)


class FakeEngine:
    def __init__(self):
        self.calls = 0

    def generate(self, prompts, sampling, seeds):
        self.calls += 1
        out = []
        for position, (prompt, seed) in enumerate(zip(prompts, seeds)):
            g = torch.Generator().manual_seed(int(seed))
            for k in range(sampling.n):
                kind = int(torch.randint(0, 4, (1,), generator=g))
                n = [0, 1, int(torch.randint(2, 300, (1,), generator=g)), 4000][kind]
                ids = torch.randint(0, 152_000, (n,), generator=g).tolist()
                lps = (-torch.rand(n, generator=g) * 20).tolist()
                text = " ".join(str(t % 10) for t in ids[:50])
                out.append(Completion(position, ids, lps, text, REASONS[(kind + k) % 4]))
        return out


def make_prompts(count):
    return [{"token_ids": list(range(i % 5 + 1)), "answer": str(i % 10)} for i in range(count)]


def make_layout(world, rank, rollout_tp):
    from megatron_cegppo.platform import current_platform
    from megatron_cegppo.trainer.distributed import Layout

    return Layout(world=world, rank=rank, tp=1, pp=1, dp=world, tp_rank=0, pp_rank=0, dp_rank=rank,
                  dp_group=None, is_last_stage=True, rollout_tp=rollout_tp, platform=current_platform())


def old_generate(phase, layouts, indices, step, round_):
    """The former exchange, run locally: each leader's groups built as before, then what
    ``all_gather_object`` gave every rank."""
    from megatron_cegppo.trainer.rollout_phase import Group, request_seed

    gathered = []
    for L in layouts:
        mine = indices[L.rollout_group::L.rollout_groups]
        completions = FakeEngine().generate(
            [phase.prompts[i]["token_ids"] for i in mine], phase.sampling,
            [request_seed(phase.seed, step, round_, i) for i in mine]) if mine else []
        by_position = [[] for _ in mine]
        for c in completions:
            by_position[c.prompt_index].append(c)
        groups = []
        for index, cs in zip(mine, by_position):
            for c in cs:
                c.prompt_index = index
            texts = [c.text for c in cs]
            rewards = compute_rewards(phase.reward, texts, [phase.prompts[index]["answer"]] * len(cs))
            groups.append(Group(index, list(phase.prompts[index]["token_ids"]), cs, rewards, texts))
        gathered.append(groups if L.rollout_leader else [])
    by_index = {g.prompt_index: g for part in gathered for g in part}
    return [by_index[i] for i in indices]


def numbers(groups):
    return [(g.prompt_index, g.prompt_ids, g.rewards,
             [(c.prompt_index, c.token_ids, c.logprobs, c.finish_reason) for c in g.completions])
            for g in groups]


class Sampler:
    def __init__(self, count):
        self.next, self.count = 0, count

    def next_batch(self, n):
        out = [(self.next + i) % self.count for i in range(n)]
        self.next += n
        return out


def _refuse(*args, **kwargs):
    raise AssertionError("an object collective was called")


def worker(rank, world, rollout_tp):
    from megatron_cegppo.testing.collectives import CollectiveAudit
    from megatron_cegppo.trainer.rollout_phase import RolloutPhase

    layouts = [make_layout(world, r, rollout_tp) for r in range(world)]
    prompts = make_prompts(40)
    sampling = SamplingConfig(n=4, max_tokens=4000)
    phase = RolloutPhase(FakeEngine(), layouts[rank], prompts, reward="test_share_text", sampling=sampling, seed=3)
    reference = RolloutPhase(None, layouts[0], prompts, reward="test_share_text", sampling=sampling, seed=3)
    cases = [([5, 1, 30, 7, 2, 11, 0, 19, 23], 0, 0), ([4], 1, 2), ([], 2, 0), ([39, 38, 37, 36, 35], 3, 1)]
    saved = {name: getattr(dist, name) for name in
             ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")}
    results = []
    try:
        for name in saved:
            setattr(dist, name, _refuse)
        with CollectiveAudit({"cpu"}) as audit:
            for indices, step, round_ in cases:
                got = phase._generate(indices, step, round_)
                want = old_generate(reference, layouts, indices, step, round_)
                assert [g.prompt_index for g in got] == indices
                assert numbers(got) == numbers(want), (indices, step, round_)
                L = layouts[rank]
                mine = set(indices[L.rollout_group::L.rollout_groups])
                for g, w in zip(got, want):
                    if g.prompt_index in mine:  # generated here: the texts are kept
                        assert g.texts == w.texts and [c.text for c in g.completions] == w.texts
                    else:
                        assert g.texts == [] and all(c.text == "" for c in g.completions)
                results.append(numbers(got))
            groups, seen, stats = phase.collect(Sampler(40), step=5, num_prompts=6, dynamic=True, max_rounds=3)
            results.append((numbers(groups), seen, stats))
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
    assert {name for name, _ in audit.calls} <= {"all_gather", "broadcast"}
    return results, len(audit.calls)


@pytest.mark.parametrize("world,rollout_tp", [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_every_rank_gets_the_groups_all_gather_object_gave(world, rollout_tp):
    ranks = run_distributed(worker, world, rollout_tp, timeout=300)
    first, calls = ranks[0]
    assert calls > 0
    for results, _ in ranks[1:]:
        assert results == first
    groups, seen, stats = first[-1]
    assert len(groups) == 6 and stats["sampling/rounds"] >= 1
