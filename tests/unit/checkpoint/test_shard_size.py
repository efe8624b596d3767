"""``--shard-size`` parsing and the packing of exported tensors into safetensors shards."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_cegppo.checkpoint.export import INDEX, SINGLE, ShardWriter, parse_shard_size


@pytest.mark.parametrize("text,expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("500mb", 500 * 10**6), ("2GiB", 2 * 2**30),
    ("64KiB", 65536), ("10kB", 10_000), ("1.5GB", 1_500_000_000), ("1048576", 1048576),
    (" 3 MB ", 3 * 10**6), ("7B", 7), (4096, 4096),
])
def test_shard_sizes_parse(text, expected):
    assert parse_shard_size(text) == expected


@pytest.mark.parametrize("text", ["0", "0GB", "-5GB", "-1", 0, -3, "abc", "5XB", "", "GB", "5 G B", "1e9", True])
def test_bad_shard_sizes_are_named(text):
    with pytest.raises(ValueError, match=r"--shard-size") as info:
        parse_shard_size(text)
    assert repr(text) in str(info.value)


def test_cli_refuses_a_bad_shard_size(tmp_path, capsys):
    from megatron_cegppo.cli import main

    code = main(["export", "--config", "configs/tiny_cpu.yaml", "--out", str(tmp_path / "out"),
                 "--shard-size=-2GB", "parallel.tensor=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--shard-size '-2GB'" in err and "positive" in err
    assert not (tmp_path / "out").exists()


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [(f"t{i}", torch.randn(n, generator=g)) for i, n in enumerate([10, 30, 5, 100, 20, 1])]


def test_tensors_are_packed_in_order_and_indexed(tmp_path):
    from safetensors.torch import load_file

    lines = []
    writer = ShardWriter(tmp_path, shard_size=40 * 4, log=lines.append)
    for name, t in _tensors():
        writer.add(name, t)
    files = writer.finish()
    # 10+30 | 5 | 100 (larger than a shard: alone) | 20+1
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + [INDEX]
    assert len(lines) == 4 and "shard 3 written (1 tensors" in lines[2]
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == 166 * 4
    assert index["weight_map"] == {"t0": files[0], "t1": files[0], "t2": files[1], "t3": files[2],
                                   "t4": files[3], "t5": files[3]}
    union = {}
    for file in files[:-1]:
        part = load_file(str(tmp_path / file))
        assert sum(t.numel() * 4 for t in part.values()) <= 160 or len(part) == 1
        union.update(part)
    assert union.keys() == dict(_tensors()).keys()
    for name, t in _tensors():
        assert torch.equal(union[name], t), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no part files left


def test_one_shard_is_a_single_file(tmp_path):
    from megatron_cegppo.models.hf_io import read_hf_state

    writer = ShardWriter(tmp_path, shard_size=10**9, log=lambda line: None)
    for name, t in _tensors():
        writer.add(name, t)
    assert writer.finish() == [SINGLE]
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE]
    state = read_hf_state(tmp_path)
    assert all(torch.equal(state[name], t) for name, t in _tensors())


def test_a_name_twice_is_refused(tmp_path):
    writer = ShardWriter(tmp_path, shard_size=100, log=lambda line: None)
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'a' exported twice"):
        writer.add("a", torch.zeros(2))
