"""The rollout phase's dynamic sampling in one process: groups whose rewards are all equal
are replaced while rounds remain, and fill a batch still short after the last round; or (the
authors' mode) more prompts are generated in one round and a short batch is cut to whole
mini-batches of the kept groups."""

from __future__ import annotations

from types import SimpleNamespace

from megatron_cegppo.rollout.engine import Completion, SamplingConfig
from megatron_cegppo.trainer.rollout_phase import RolloutPhase

N = 2  # responses per prompt
# prompt index -> its responses: 0 and 2 all right, 1 and 3 half right, 4 all wrong
RESPONSES = {0: ["\\boxed{1}", "\\boxed{1}"], 1: ["\\boxed{1}", "\\boxed{9}"], 2: ["\\boxed{1}", "\\boxed{1}"],
             3: ["\\boxed{9}", "\\boxed{1}"], 4: ["\\boxed{9}", "\\boxed{9}"]}
PROMPTS = [{"token_ids": [index + 1], "answer": "1"} for index in RESPONSES]
LAYOUT = SimpleNamespace(rollout_group=0, rollout_groups=1, world=1, rollout_leader=True)


class Engine:
    def generate(self, prompts, sampling, seeds):
        return [Completion(position, [7], [-0.5], text)
                for position, ids in enumerate(prompts) for text in RESPONSES[ids[0] - 1]]


class Sampler:
    def __init__(self):
        self.next = 0

    def next_batch(self, n):
        out = [(self.next + i) % len(PROMPTS) for i in range(n)]
        self.next += n
        return out


def collect(num_prompts, max_rounds, **kw):
    phase = RolloutPhase(Engine(), LAYOUT, PROMPTS, reward="arithmetic", sampling=SamplingConfig(n=N, max_tokens=4),
                         seed=0)
    return phase.collect(Sampler(), step=0, num_prompts=num_prompts, dynamic=True, max_rounds=max_rounds, **kw)


def test_groups_with_equal_rewards_are_replaced():
    groups, seen, stats = collect(num_prompts=2, max_rounds=3)
    assert [g.prompt_index for g in groups] == [1, 3]
    assert seen == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]  # every response of both rounds
    assert stats["sampling/rounds"] == 2 and stats["sampling/filled_groups"] == 0


def test_a_short_batch_is_filled_with_the_dropped_groups():
    groups, _, stats = collect(num_prompts=3, max_rounds=1)
    assert [g.prompt_index for g in groups] == [1, 0, 2]  # the one kept, then the dropped
    assert stats == {"sampling/rounds": 1, "sampling/kept_frac": 1 / 3, "sampling/filled_groups": 2,
                     "sampling/trained_groups": 3}


def test_more_prompts_per_round_fill_the_batch_in_one_round():
    groups, _, stats = collect(num_prompts=2, max_rounds=1, per_round=5)
    assert [g.prompt_index for g in groups] == [1, 3]
    assert stats["sampling/rounds"] == 1 and stats["sampling/kept_frac"] == 2 / 5


def test_shrink_trains_the_kept_groups_cut_to_whole_minibatches():
    # 4 wanted in mini-batches of 2; one round of 5 keeps 1 and 3 only: one mini-batch, nothing filled
    groups, _, stats = collect(num_prompts=4, max_rounds=1, per_round=5, shrink_to=2)
    assert [g.prompt_index for g in groups] == [1, 3]
    assert stats["sampling/filled_groups"] == 0 and stats["sampling/trained_groups"] == 2
    # mini-batches of 1: both kept groups, no more
    groups, _, _ = collect(num_prompts=4, max_rounds=1, per_round=5, shrink_to=1)
    assert [g.prompt_index for g in groups] == [1, 3]
    # a mini-batch of 3 but 2 kept: one mini-batch, filled with a dropped group
    groups, _, stats = collect(num_prompts=3, max_rounds=1, per_round=5, shrink_to=3)
    assert [g.prompt_index for g in groups] == [1, 3, 0] and stats["sampling/filled_groups"] == 1
