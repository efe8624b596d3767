"""Checkpoint contents are digested at commit and checked on load: a same-size corruption of a
shard or of trainer_state.json is detected and the file named, loading falls back to the
newest checkpoint that verifies, pruning never deletes it, manifests of version 1 (sizes only)
still load, and digests computed by ranks on their shares equal those of one rank."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from megatron_cegppo.checkpoint.store import (
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    digest_file,
    digest_files,
    split_files,
    step_dir_name,
)

SHARD_BYTES = 64 << 10


def stage(store: CheckpointStore, step: int, ranks: int = 4) -> Path:
    staging = store.staging_dir(step)
    (staging / "megatron").mkdir(parents=True, exist_ok=True)
    (staging / "rng").mkdir(exist_ok=True)
    for r in range(ranks):
        # different sizes so that the size-balanced split is exercised
        size = SHARD_BYTES * (r + 1)
        (staging / "megatron" / f"__{r}_0.distcp").write_bytes(bytes((step + r + i) % 251 for i in range(size)))
        (staging / "rng" / f"rank_{r:05d}.pt").write_bytes(f"rng {step} {r}".encode() * 10)
    (staging / "trainer_state.json").write_text(json.dumps({"step": step, "optimizer_steps": 10 * step}, indent=1))
    return staging


def save(store: CheckpointStore, step: int, **kw) -> Path:
    stage(store, step)
    return store.commit(step, **kw)


def invert(file: Path, offset: int, length: int = 4096) -> None:
    data = bytearray(file.read_bytes())
    for i in range(offset, min(offset + length, len(data))):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def quiet_latest(store: CheckpointStore):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return store.latest()


def test_same_size_shard_corruption_is_detected_and_named(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    path = save(store, 1)
    store.verify(path)
    shard = path / "megatron" / "__2_0.distcp"
    size = shard.stat().st_size
    invert(shard, 8192)
    assert shard.stat().st_size == size
    with pytest.raises(CheckpointError, match=r"megatron/__2_0\.distcp content does not match"):
        store.verify(path)


def test_same_size_edit_of_trainer_state_is_detected(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    path = save(store, 3)
    state = path / "trainer_state.json"
    text = state.read_text()
    edited = text.replace('"step": 3', '"step": 9')
    assert edited != text and len(edited) == len(text)
    state.write_text(edited)
    with pytest.raises(CheckpointError, match=r"trainer_state\.json content does not match"):
        store.verify(path)


def test_altered_manifest_is_detected(tmp_path):
    store = CheckpointStore(tmp_path)
    path = save(store, 1)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["step"] = 2
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    with pytest.raises(CheckpointError, match="altered"):
        store.verify(path)


def test_latest_falls_back_to_the_newest_verified_with_a_warning(tmp_path):
    store = CheckpointStore(tmp_path, keep=5)
    for step in (1, 2, 3):
        save(store, step)
    invert(tmp_path / step_dir_name(3) / "megatron" / "__0_0.distcp", 0)
    invert(tmp_path / step_dir_name(2) / "trainer_state.json", 0, 4)
    fresh = CheckpointStore(tmp_path, keep=5)  # a resumed run
    with pytest.warns(UserWarning) as record:
        assert fresh.latest().name == step_dir_name(1)
    messages = " | ".join(str(w.message) for w in record)
    assert "latest checkpoint unusable" in messages and "__0_0.distcp" in messages
    assert "trainer_state.json" in messages and f"resuming from {step_dir_name(1)}" in messages


def test_latest_verified_alias(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, 1)
    assert store.latest_verified().name == step_dir_name(1)


@pytest.mark.parametrize("same_process", [True, False])
def test_pruning_keeps_the_newest_verified_when_a_newer_one_is_corrupt(tmp_path, same_process):
    store = CheckpointStore(tmp_path, keep=2)
    save(store, 1)
    save(store, 2)
    invert(tmp_path / step_dir_name(2) / "megatron" / "__1_0.distcp", 4096)  # same size
    if not same_process:
        store = CheckpointStore(tmp_path, keep=2)
    save(store, 3)  # verified: 3 and 1; 2 is damaged and does not count
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert names == [step_dir_name(1), step_dir_name(2), step_dir_name(3)]
    save(store, 4)  # now 4 and 3 are the two newest verified: 1 and 2 go
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert names == [step_dir_name(3), step_dir_name(4)]


def test_pruning_never_deletes_the_only_verified_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "run", keep=1)
    save(store, 1)
    other = CheckpointStore(tmp_path / "other", keep=1)
    damaged = save(other, 2)
    invert(damaged / "trainer_state.json", 0, 2)
    shutil.copytree(damaged, tmp_path / "run" / step_dir_name(2))  # a newer one that is damaged
    store = CheckpointStore(tmp_path / "run", keep=1)
    store._prune()
    assert (tmp_path / "run" / step_dir_name(1)).is_dir()
    assert (tmp_path / "run" / step_dir_name(2)).is_dir()
    assert quiet_latest(store).name == step_dir_name(1)


def test_manifest_without_digests_still_loads_size_checked(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    path = save(store, 1)
    manifest = json.loads((path / MANIFEST).read_text())
    old = {"format_version": 1, "step": 1, "files": manifest["files"]}  # as written before digests
    (path / MANIFEST).write_text(json.dumps(old, indent=1))
    with pytest.warns(UserWarning, match="no content digests"):
        assert store.verify(path)["files"] == manifest["files"]
    with pytest.warns(UserWarning, match="no content digests"):
        assert CheckpointStore(tmp_path).latest() == path
    shard = path / "megatron" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="has 10 bytes"):
        store.verify(path)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_parallel_digests_give_the_same_manifest_as_one_rank(tmp_path, world):
    one = CheckpointStore(tmp_path / "one")
    many = CheckpointStore(tmp_path / "many")
    stage(one, 5)
    stage(many, 5)
    shares = [many.digest_share(5, rank, world) for rank in range(world)]
    names = [set(s) for s in shares]
    assert sum(map(len, names)) == len(set().union(*names)) == len(many.staged_files(5))  # disjoint, complete
    merged = {k: v for share in shares for k, v in share.items()}
    a = json.loads((one.commit(5) / MANIFEST).read_text())
    b = json.loads((many.commit(5, digests=merged) / MANIFEST).read_text())
    assert a == b
    many.verify(tmp_path / "many" / step_dir_name(5))


def test_commit_hashes_files_a_share_missed_and_rejects_unknown_names(tmp_path):
    store = CheckpointStore(tmp_path)
    staging = stage(store, 1)
    partial = digest_files(split_files(store.staged_files(1), 0, 2), root=staging)
    with pytest.raises(CheckpointError, match="not staged"):
        store.commit(1, digests={**partial, "megatron/nope.distcp": "00"})
    path = store.commit(1, digests=partial)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["digests"] == digest_files(sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST),
                                               root=path, workers=1)


def test_verify_accepts_digests_computed_by_ranks(tmp_path):
    store = CheckpointStore(tmp_path)
    path = save(store, 1)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    shares = [digest_files(split_files(files, r, 3), root=path) for r in range(3)]
    merged = {k: v for s in shares for k, v in s.items()}
    store.verify(path, digests=merged)
    bad = dict(merged, **{"trainer_state.json": "0" * 64})
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        store.verify(path, digests=bad)


def test_digest_file_streams_in_chunks(tmp_path):
    import hashlib
    file = tmp_path / "x.bin"
    data = bytes(range(256)) * 1000 + b"tail"
    file.write_bytes(data)
    assert digest_file(file, chunk=4096) == digest_file(file) == hashlib.sha256(data).hexdigest()


def test_shares_of_a_checkpoint_at_resume_cover_every_file_once_and_verify_it(tmp_path):
    """At resume every rank hashes its share; together they are what verify needs, and a
    damaged file in any share is named."""
    store = CheckpointStore(tmp_path / "ckpt", keep=3)
    stage(store, 1)
    final = store.commit(1)
    manifest = json.loads((final / MANIFEST).read_text())
    shares = [CheckpointStore.share_digests(final, r, 3) for r in range(3)]
    assert sum(len(s) for s in shares) == len(manifest["files"])
    merged = {k: v for s in shares for k, v in s.items()}
    assert merged == manifest["digests"]
    store.check(final, digests=merged)
    shard = final / "megatron" / "__2_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    merged = {k: v for r in range(3) for k, v in CheckpointStore.share_digests(final, r, 3).items()}
    with pytest.raises(CheckpointError, match="__2_0.distcp content does not match"):
        store.check(final, digests=merged)
    assert CheckpointStore.share_digests(tmp_path / "missing", 0, 1) == {}


def test_candidates_are_tried_latest_first_then_newest_first(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep=5)
    for step in (1, 2, 3):
        stage(store, step)
        store.commit(step)
    (store.root / "latest").write_text(step_dir_name(2) + "\n")
    assert [p.name for p in store.candidates()] == [step_dir_name(s) for s in (2, 3, 1)]


def test_a_failed_save_is_one_line_that_says_when_the_disk_is_full(tmp_path, monkeypatch):
    import shutil as shutil_mod
    from collections import namedtuple

    from megatron_cegppo.checkpoint.store import describe_write_failure

    store = CheckpointStore(tmp_path / "ckpt")
    stage(store, 1)
    store.commit(1)

    class Gathered(BaseException):  # what torch.distributed.checkpoint raises: every rank's failure
        def __init__(self, failures):
            super().__init__("CheckpointException ranks:" + str(list(failures)))
            self.failures = failures

    wrapped = Gathered({1: (RuntimeError("Traceback (most recent call last):\n  ...\nRuntimeError: unexpected pos 704"),
                            None)})
    assert describe_write_failure(wrapped, store) == "rank 1: RuntimeError: unexpected pos 704"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda path: usage(14 << 20, (14 << 20) - 4096, 4096))
    line = describe_write_failure(OSError(28, "No space left on device"), store)
    assert line.startswith("OSError: [Errno 28] No space left on device; the file system of ")
    assert "is full (0.0 MiB free" in line and "\n" not in line
