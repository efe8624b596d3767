"""Packing sampled groups into one flat int32 tensor and back (megatron_cegppo.rollout.exchange),
and the exchange in a world of one."""

from __future__ import annotations

import struct

import pytest
import torch
import torch.distributed as dist

from megatron_cegppo.rollout.engine import Completion
from megatron_cegppo.rollout.exchange import SampledGroup, pack_groups, share_groups, unpack_groups
from megatron_cegppo.testing.multiprocess import free_port


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def sample_groups() -> list[SampledGroup]:
    g = torch.Generator().manual_seed(0)

    def completion(index, n, reason):
        ids = torch.randint(0, 151_000, (n,), generator=g).tolist()
        lps = (-torch.rand(n, generator=g) * 10).tolist()  # float32 values
        return Completion(index, ids, lps, "text that does not travel", reason)

    return [
        SampledGroup(17, [completion(17, 5, "stop"), completion(17, 0, "length"), completion(17, 3000, None)],
                     [1.0, 0.0, 0.1]),
        SampledGroup(3, [], []),  # a group without completions survives as one
        SampledGroup(0, [completion(0, 1, "abort"), completion(0, 2, ""), completion(0, 7, "stöp ✓")],
                     [-2.5, 1e-300, float("inf")]),
        SampledGroup(2**40, [completion(2**40, 4, "stop")], [0.5]),
    ]


def as_tuples(groups):
    return [(g.prompt_index, g.rewards,
             [(c.prompt_index, c.token_ids, c.logprobs, c.finish_reason) for c in g.completions])
            for g in groups]


def test_round_trip_is_exact():
    groups = sample_groups()
    buffer = pack_groups(groups)
    assert buffer.dtype == torch.int32 and buffer.dim() == 1
    back = unpack_groups(buffer)
    assert as_tuples(back) == as_tuples(groups)
    assert all(c.text == "" for g in back for c in g.completions)  # texts are not shipped
    assert all(type(r) is float for g in back for r in g.rewards)
    assert all(type(t) is int for g in back for c in g.completions for t in c.token_ids)


def test_buffer_holds_two_int32_per_token_and_a_small_header():
    groups = sample_groups()
    tokens = sum(len(c.token_ids) for g in groups for c in g.completions)
    completions = sum(len(g.completions) for g in groups)
    extra = pack_groups(groups).numel() - 2 * tokens
    reasons = {"stop", "length", "abort", "", "stöp ✓"}
    table = sum(len((r + "\n").encode()) for r in reasons)
    assert extra == 2 * (3 + 2 * len(groups) + 3 * completions + table)


def test_logprobs_travel_as_float32():
    groups = [SampledGroup(0, [Completion(0, [1, 2], [0.1, -1 / 3])], [0.1])]
    back = unpack_groups(pack_groups(groups))
    assert back[0].completions[0].logprobs == [f32(0.1), f32(-1 / 3)]
    assert back[0].rewards == [0.1]  # rewards are float64


def test_nothing_packs_to_a_header_and_an_empty_buffer_to_nothing():
    assert unpack_groups(pack_groups([])) == []
    assert unpack_groups(torch.empty(0, dtype=torch.int32)) == []


def test_inconsistent_groups_are_refused():
    with pytest.raises(ValueError, match="rewards"):
        pack_groups([SampledGroup(0, [Completion(0, [1], [-1.0])], [])])
    with pytest.raises(ValueError, match="log-probs"):
        pack_groups([SampledGroup(0, [Completion(0, [1, 2], [-1.0])], [0.0])])
    with pytest.raises(ValueError, match="newline"):
        pack_groups([SampledGroup(0, [Completion(0, [1], [-1.0], "", "a\nb")], [0.0])])
    with pytest.raises(ValueError, match="int32"):
        pack_groups([SampledGroup(0, [Completion(0, [2**31], [-1.0])], [0.0])])


def test_a_truncated_buffer_is_refused():
    buffer = pack_groups(sample_groups())
    with pytest.raises(ValueError, match="header describes"):
        unpack_groups(buffer[:-1])


@pytest.fixture
def world_of_one():
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_share_in_a_world_of_one(world_of_one):
    groups = sample_groups()
    assert as_tuples(share_groups(groups, send=True, device=torch.device("cpu"))) == as_tuples(groups)
    assert share_groups(groups, send=False, device=torch.device("cpu")) == []


def test_every_completion_field_is_carried_or_known_not_to_travel():
    """A field added to Completion must be added to the exchange (or here, if it stays local)."""
    import dataclasses

    carried = {"prompt_index", "token_ids", "logprobs", "finish_reason"}
    local = {"text"}
    assert {f.name for f in dataclasses.fields(Completion)} == carried | local
