"""Checkpoint directories are complete or ignored: kill -9 at random moments while saving, a
truncated file, a missing manifest, a dangling ``latest``; old checkpoints pruned."""

from __future__ import annotations

import multiprocessing as mp
import random
import time
import warnings
from pathlib import Path

import pytest

from megatron_cegppo.checkpoint.store import CheckpointError, CheckpointStore, step_dir_name

FILES, CHUNKS, CHUNK = 4, 8, 16 << 10


def save_fake(store: CheckpointStore, step: int, pause: float = 0.0) -> Path:
    """Every file of checkpoint ``step`` holds the step number: a mixed checkpoint shows."""
    staging = store.staging_dir(step)
    (staging / "shards").mkdir(parents=True, exist_ok=True)
    payload = (f"{step:08d}".encode() * (CHUNK // 8))
    for i in range(FILES):
        with open(staging / "shards" / f"rank_{i}.bin", "wb") as f:
            for _ in range(CHUNKS):
                f.write(payload)
                f.flush()
                if pause:
                    time.sleep(pause)
    return store.commit(step)


def check_consistent(path: Path) -> int:
    step = int(path.name.split("_")[1])
    for file in (path / "shards").iterdir():
        data = file.read_bytes()
        assert len(data) == CHUNKS * CHUNK and data == f"{step:08d}".encode() * (len(data) // 8), file
    return step


def writer(root: str, start: int):
    store = CheckpointStore(root, keep=2)
    store.clean_staging()
    step = start
    while True:
        save_fake(store, step, pause=0.0005)
        step += 1


def test_commit_latest_and_pruning(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    assert store.latest() is None
    for step in (1, 2, 3):
        save_fake(store, step)
    assert store.latest().name == step_dir_name(3)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == [
        step_dir_name(2), step_dir_name(3)]
    save_fake(store, 3)  # the same step again replaces it
    assert check_consistent(store.latest()) == 3


def test_truncated_file_is_detected_and_the_previous_checkpoint_used(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    save_fake(store, 1)
    last = save_fake(store, 2)
    shard = last / "shards" / "rank_2.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="rank_2.bin has 100 bytes"):
        store.verify(last)
    with pytest.warns(UserWarning, match="latest checkpoint unusable"):
        assert store.latest().name == step_dir_name(1)


def test_missing_manifest_and_dangling_pointer(tmp_path):
    store = CheckpointStore(tmp_path)
    save_fake(store, 5)
    (tmp_path / step_dir_name(6)).mkdir()  # a directory that never got its manifest
    (tmp_path / "latest").write_text(step_dir_name(7))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert store.latest().name == step_dir_name(5)
    with pytest.raises(CheckpointError, match="did not finish"):
        store.verify(tmp_path / step_dir_name(6))


def test_kill_9_during_saves_never_leaves_an_unusable_latest(tmp_path):
    ctx = mp.get_context("spawn")
    rng = random.Random(0)
    root = tmp_path / "ckpt"
    start = 0
    resumed_from = []
    for trial in range(12):
        proc = ctx.Process(target=writer, args=(str(root), start))
        proc.start()
        time.sleep(rng.uniform(0.5, 2.0) if trial == 0 else rng.uniform(0.05, 0.6))
        proc.kill()
        proc.join()
        store = CheckpointStore(root, keep=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            latest = store.latest()
        if latest is None:
            assert trial == 0 or not resumed_from, "a committed checkpoint disappeared"
            continue
        step = check_consistent(latest)
        assert not resumed_from or step >= resumed_from[-1], "went back to an older checkpoint"
        resumed_from.append(step)
        start = step + 1
    assert len(resumed_from) >= 5, resumed_from
