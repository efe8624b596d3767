"""Group advantages, KL estimators, DAPO dynamic sampling, minibatch splitting — checked
against plain-Python references."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_cegppo.algorithms import (
    DynamicSampler,
    dynamic_sampling_filter,
    grpo_advantages,
)
from megatron_cegppo.losses.kl import kl_penalty

# ---- advantages -------------------------------------------------------------------------


def _reference_advantages(rewards, n, eps, normalize_std):
    out = []
    for g in range(0, len(rewards), n):
        group = rewards[g:g + n]
        mean = statistics.mean(group)
        if len(set(group)) == 1:
            out += [0.0] * n
        elif normalize_std:
            std = statistics.stdev(group)
            out += [(r - mean) / (std + eps) for r in group]
        else:
            out += [r - mean for r in group]
    return out


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 6),
    data=st.data(),
    normalize_std=st.booleans(),
)
def test_grpo_advantages_match_reference(n, data, normalize_std):
    groups = data.draw(st.integers(1, 5))
    rewards = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.5]), min_size=groups * n, max_size=groups * n))
    got = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), n, eps=1e-6, normalize_std=normalize_std)
    ref = _reference_advantages(rewards, n, 1e-6, normalize_std)
    assert got.shape == (groups * n,)
    assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64), atol=1e-12)


def test_grpo_advantages_known_values():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3)
    got = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, eps=0.0)
    s = 0.5 / math.sqrt(1 / 3)
    assert torch.allclose(got, torch.tensor([s, -s, -s, s]))
    got = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, normalize_std=False)
    assert got.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_grpo_advantages_2d_int_and_equal_groups():
    flat = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 1.0])
    assert torch.equal(grpo_advantages(flat, 3), grpo_advantages(flat.view(2, 3), 3))
    # float32 mean of seven 0.1s is an ulp off 0.1; the group must still give exact zeros
    equal = torch.full((7,), 0.1)
    assert (equal - equal.mean()).abs().max() > 0
    assert grpo_advantages(equal, 7).tolist() == [0.0] * 7
    assert grpo_advantages(equal, 7, normalize_std=False).tolist() == [0.0] * 7
    ints = grpo_advantages(torch.tensor([[1, 0], [1, 1]]), 2)
    assert ints.is_floating_point() and ints[2:].tolist() == [0.0, 0.0]
    assert grpo_advantages(torch.tensor([3.0, 5.0]), 1).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("rewards, n, pattern", [
    (torch.zeros(5), 2, "group_size=2"),
    (torch.zeros(2, 3), 2, r"shape \(2, 3\) but group_size=2"),
    (torch.tensor([0.0, float("nan")]), 2, "NaN"),
    (torch.zeros(4), 0, "group_size"),
])
def test_grpo_advantages_errors(rewards, n, pattern):
    with pytest.raises(ValueError, match=pattern):
        grpo_advantages(rewards, n)


# ---- KL penalty -------------------------------------------------------------------------


def test_kl_penalty_matches_formulas():
    lp = torch.tensor([-1.0, -0.5, -2.0, -0.3], dtype=torch.float64)
    ref = torch.tensor([-1.2, -0.5, -0.1, -3.0], dtype=torch.float64)
    for kind, f in {
        "k1": lambda a, b: a - b,
        "k2": lambda a, b: 0.5 * (a - b) ** 2,
        "k3": lambda a, b: math.exp(b - a) - (b - a) - 1,
    }.items():
        want = [f(a, b) for a, b in zip(lp.tolist(), ref.tolist())]
        assert torch.allclose(kl_penalty(lp, ref, kind), torch.tensor(want, dtype=torch.float64), rtol=1e-12), kind
    assert (kl_penalty(lp, ref) >= 0).all()                # k3 default and non-negative
    assert kl_penalty(lp, ref)[1] == 0


def test_kl_penalty_k3_gradient_and_precision():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0])
    kl_penalty(lp, ref).sum().backward()
    # d/dlp [exp(ref-lp) - (ref-lp) - 1] = 1 - exp(ref-lp)
    assert torch.allclose(lp.grad, torch.tensor([0.0, 1 - math.e]))
    tiny = torch.tensor([1e-6], dtype=torch.float32)
    assert torch.allclose(kl_penalty(torch.zeros(1), tiny), torch.tensor([0.5e-12]), rtol=1e-3)


def test_kl_penalty_errors():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="differ"):
        kl_penalty(torch.zeros(2), torch.zeros(3))


# ---- dynamic sampling -------------------------------------------------------------------


def test_dynamic_sampling_filter_matches_loop():
    r = torch.tensor([1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5, 0, 0, 0.7])
    want = [len(set(r[i:i + 3].tolist())) > 1 for i in range(0, 12, 3)]
    assert dynamic_sampling_filter(r, 3).tolist() == want == [False, True, False, True]
    assert dynamic_sampling_filter(r.view(4, 3), 3).tolist() == want


class ScriptedGenerate:
    """Returns pre-set rounds of (records, rewards); records are (round, group) labels."""

    def __init__(self, rounds):
        self.rounds, self.calls = rounds, []

    def __call__(self, num_groups):
        self.calls.append(num_groups)
        rewards = self.rounds[min(len(self.calls) - 1, len(self.rounds) - 1)]
        return [(len(self.calls), g) for g in range(len(rewards))], torch.tensor(rewards)


def test_dynamic_sampler_collects_and_truncates():
    gen = ScriptedGenerate([
        [[1, 1], [0, 1], [0, 0], [1, 1]],                  # keeps group 1
        [[1, 0], [1, 1], [0, 1], [0.5, 0]],                # keeps 0, 2, 3
    ])
    res = DynamicSampler(gen, target_groups=3, group_size=2, max_rounds=5).sample()
    assert gen.calls == [3, 3]                             # a full batch per round by default
    assert res.records == [(1, 1), (2, 0), (2, 2)]         # extras truncated, order kept
    assert res.rewards.tolist() == [[0, 1], [1, 0], [0, 1]]
    assert (res.rounds, res.generated_groups, res.kept_groups) == (2, 8, 4)
    assert res.complete and res.shortfall == 0


def test_dynamic_sampler_gives_up_after_max_rounds():
    gen = ScriptedGenerate([[[1, 1, 1]], [[0, 1, 0]]])
    res = DynamicSampler(gen, target_groups=4, group_size=3, max_rounds=3, groups_per_round=1).sample()
    assert gen.calls == [1, 1, 1]
    assert res.records == [(2, 0), (3, 0)]
    assert res.rewards.shape == (2, 3)
    assert (res.rounds, res.generated_groups, res.kept_groups) == (3, 3, 2)
    assert not res.complete and res.shortfall == 2


def test_dynamic_sampler_nothing_kept():
    res = DynamicSampler(ScriptedGenerate([[[0, 0]]]), target_groups=2, group_size=2, max_rounds=2).sample()
    assert res.records == [] and res.rewards.shape == (0, 2) and res.shortfall == 2


def test_dynamic_sampler_errors():
    bad = lambda n: ([0], torch.zeros(2, 2))              # noqa: E731  one record, two groups
    with pytest.raises(ValueError, match="1 records but 2 reward groups"):
        DynamicSampler(bad, target_groups=1, group_size=2).sample()
    with pytest.raises(ValueError, match="target_groups"):
        DynamicSampler(bad, target_groups=0, group_size=2)
    with pytest.raises(ValueError, match="max_rounds"):
        DynamicSampler(bad, target_groups=1, group_size=2, max_rounds=0)


# ---- minibatches ------------------------------------------------------------------------
