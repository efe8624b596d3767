"""Token-budget micro-batch packing over data-parallel ranks: the contract (property tests),
the errors, determinism, and the balance/fill targets on long-tailed length distributions."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_cegppo.algorithms.packing import pack_microbatches, packing_stats
from megatron_cegppo.testing.lengths import bimodal_lengths, lognormal_lengths


def _check_contract(lengths, packs, max_tokens, dp_size):
    assert len(packs) == dp_size
    seen = sorted(i for rank in packs for mb in rank for i in mb)
    assert seen == list(range(len(lengths)))
    for rank in packs:
        for mb in rank:
            assert mb, "empty micro-batch"
            assert sum(lengths[i] for i in mb) <= max_tokens
    if len(lengths) >= dp_size:
        assert all(len(rank) >= 1 for rank in packs)


# ---- contract --------------------------------------------------------------------------------


@st.composite
def _problems(draw):
    max_tokens = draw(st.integers(1, 5000))
    dp_size = draw(st.integers(1, 8))
    n = draw(st.integers(dp_size, 120))
    lengths = draw(st.lists(st.integers(1, max_tokens), min_size=n, max_size=n))
    return lengths, max_tokens, dp_size


@settings(max_examples=300, deadline=None)
@given(_problems())
def test_every_index_once_and_budget_respected(problem):
    lengths, max_tokens, dp_size = problem
    packs = pack_microbatches(lengths, max_tokens=max_tokens, dp_size=dp_size)
    _check_contract(lengths, packs, max_tokens, dp_size)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.data())
def test_exactly_dp_size_sequences_gives_each_rank_one(dp_size, data):
    lengths = data.draw(st.lists(st.integers(1, 100), min_size=dp_size, max_size=dp_size))
    packs = pack_microbatches(lengths, max_tokens=100, dp_size=dp_size)
    assert sorted(len(r) for r in packs) == [1] * dp_size
    _check_contract(lengths, packs, 100, dp_size)


@settings(max_examples=100, deadline=None)
@given(_problems())
def test_deterministic_and_input_type_independent(problem):
    lengths, max_tokens, dp_size = problem
    a = pack_microbatches(lengths, max_tokens=max_tokens, dp_size=dp_size)
    b = pack_microbatches(list(lengths), max_tokens=max_tokens, dp_size=dp_size)
    c = pack_microbatches(np.asarray(lengths, dtype=np.int64), max_tokens=max_tokens, dp_size=dp_size)
    d = pack_microbatches(tuple(lengths), max_tokens=max_tokens, dp_size=dp_size)
    assert a == b == c == d
    assert all(type(i) is int for rank in c for mb in rank for i in mb)


def test_stable_ties():
    # equal lengths: dealt to ranks in index order, lower rank first
    assert pack_microbatches([5, 5, 5, 5], max_tokens=10, dp_size=2) == [[[0, 2]], [[1, 3]]]
    assert pack_microbatches([3] * 6, max_tokens=6, dp_size=1) == [[[0, 1], [2, 3], [4, 5]]]


def test_known_packing():
    lengths = [9, 1, 5, 5, 2, 8]
    # LPT, longest first: 9->r0, 8->r1, 5(#2)->r1, 5(#3)->r0, 2->r1, 1->r0 (15 tokens each);
    # then best fit per rank: the 1 joins the 9 (free 1), the 2 joins the 8 (free 2)
    assert pack_microbatches(lengths, max_tokens=10, dp_size=2) == [[[0, 1], [3]], [[5, 4], [2]]]


def test_dp1_is_plain_best_fit_decreasing():
    lengths = [6, 4, 3, 7, 2, 8]
    packs = pack_microbatches(lengths, max_tokens=10, dp_size=1)
    # 8 | 7 | 6 ; 4 -> 6 (fullest that fits: free 4), 3 -> 7, 2 -> 8
    assert packs == [[[5, 4], [3, 2], [0, 1]]]


def test_empty_input():
    assert pack_microbatches([], max_tokens=16, dp_size=3) == [[], [], []]
    assert pack_microbatches(np.array([], dtype=np.int64), max_tokens=16, dp_size=1) == [[]]


# ---- errors ------------------------------------------------------------------------------------


def test_too_long_names_index_length_and_budget():
    with pytest.raises(ValueError) as e:
        pack_microbatches([10, 20, 17000, 30, 20000], max_tokens=16384, dp_size=1)
    msg = str(e.value)
    assert "sequence 2" in msg and "17000" in msg and "16384" in msg
    assert "1 more" in msg


@pytest.mark.parametrize("bad", [0, -3, 2.0, 2.5, "4", None, True, float("nan")])
def test_bad_lengths(bad):
    with pytest.raises(ValueError, match=r"lengths\[1\]"):
        pack_microbatches([4, bad, 4], max_tokens=16, dp_size=1)


@pytest.mark.parametrize("bad", [0, -1, 16.0, True, None, "16"])
def test_bad_max_tokens(bad):
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        pack_microbatches([4, 4], max_tokens=bad, dp_size=1)


@pytest.mark.parametrize("bad", [0, -2, 2.0, False, None])
def test_bad_dp_size(bad):
    with pytest.raises(ValueError, match="dp_size must be a positive int"):
        pack_microbatches([4, 4], max_tokens=16, dp_size=bad)


def test_fewer_sequences_than_ranks():
    with pytest.raises(ValueError, match=r"3 sequences .* dp_size=4"):
        pack_microbatches([4, 4, 4], max_tokens=16, dp_size=4)


# ---- stats ---------------------------------------------------------------------------------------


def test_packing_stats():
    lengths = [6, 4, 3, 7]
    packs = [[[0, 1]], [[3], [2]]]
    s = packing_stats(lengths, packs, 10)
    assert s["rank_tokens"] == [10, 10]
    assert s["max_dev_pct"] == 0.0
    assert s["microbatches_per_rank"] == [1, 2]
    assert s["num_microbatches"] == 3
    assert s["mean_fill"] == pytest.approx(20 / 30)
    assert s["max_microbatch_tokens"] == 10
    s = packing_stats([1, 3], [[[0]], [[1]]], 4)
    assert s["max_dev_pct"] == pytest.approx(50.0)
    empty = packing_stats([], [[], []], 4)
    assert empty["max_dev_pct"] == 0.0 and empty["mean_fill"] == 0.0 and empty["num_microbatches"] == 0


# ---- targets on long-tailed lengths ----------------------------------------------------------


@pytest.mark.parametrize("dist", [lognormal_lengths, bimodal_lengths], ids=["lognormal", "bimodal"])
@pytest.mark.parametrize("max_tokens", [16384, 32768])
@pytest.mark.parametrize("dp_size", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balance_and_fill_targets(dist, max_tokens, dp_size, seed):
    lengths = dist(np.random.default_rng(seed))
    packs = pack_microbatches(lengths, max_tokens=max_tokens, dp_size=dp_size)
    _check_contract(lengths.tolist(), packs, max_tokens, dp_size)
    s = packing_stats(lengths, packs, max_tokens)
    assert s["max_dev_pct"] < 5.0, s
    assert s["mean_fill"] >= 0.85, s
    counts = s["microbatches_per_rank"]
    assert max(counts) - min(counts) <= 1, counts


def test_distributions_are_long_tailed():
    a = lognormal_lengths(np.random.default_rng(0))
    assert 10 < a.max() / np.median(a) <= 17
    b = bimodal_lengths(np.random.default_rng(0))
    assert 0.15 < np.mean(b == 16384) < 0.25 and 1500 < np.median(b[b < 16384]) < 2600


def test_split_to_multiple_keeps_every_sequence_and_the_budget():
    from megatron_cegppo.algorithms.packing import split_to_multiple

    lengths = [10, 9, 8, 3, 2, 2, 1]
    packs = [[0, 4, 5], [1, 3, 6], [2]]
    out = split_to_multiple(packs, lengths, 2)
    assert len(out) == 4
    assert sorted(i for p in out for i in p) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in p) for p in out) <= max(sum(lengths[i] for i in p) for p in packs)
    assert split_to_multiple(packs, lengths, 3) == packs  # already a multiple
    with pytest.raises(ValueError, match="cannot become a multiple of 2"):
        split_to_multiple([[0], [1], [2]], lengths, 2)
