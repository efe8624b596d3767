"""Finding a Megatron-LM torch_dist checkpoint (``model.megatron_checkpoint``) without torch:
a save folder through its tracker file (an iteration, or ``release``), or one iteration's
folder; everything else refused as one line naming the setting and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_cegppo.checkpoint.megatron_lm import MegatronCheckpointError, resolve_iteration_dir
from megatron_cegppo.config.errors import ConfigError

METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
            "common_backend_version": 1}


def write_iteration(save: Path, name: str, metadata: dict | None = METADATA) -> Path:
    folder = save / name
    folder.mkdir(parents=True)
    if metadata is not None:
        (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


def refused(path, *parts: str) -> str:
    with pytest.raises(MegatronCheckpointError) as e:
        resolve_iteration_dir(path)
    message = str(e.value)
    assert message.startswith("model.megatron_checkpoint: ") and "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


def test_the_tracker_names_the_iteration(tmp_path):
    write_iteration(tmp_path, "iter_0000100")
    newest = write_iteration(tmp_path, "iter_0000200")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("200\n")
    assert resolve_iteration_dir(tmp_path) == newest
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("100")
    assert resolve_iteration_dir(tmp_path) == tmp_path / "iter_0000100"


def test_release_and_an_iteration_folder_itself(tmp_path):
    release = write_iteration(tmp_path, "release", {"sharded_backend": "torch_dist", "sharded_backend_version": 1})
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert resolve_iteration_dir(tmp_path) == release
    assert resolve_iteration_dir(release) == release  # the newer metadata.json, without common_backend


def test_a_larger_iteration_keeps_its_digits(tmp_path):
    folder = write_iteration(tmp_path, "iter_12345678")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("12345678")
    assert resolve_iteration_dir(tmp_path) == folder


def test_missing_or_a_file(tmp_path):
    refused(tmp_path / "nope", "does not exist")
    (tmp_path / "f").write_text("x")
    refused(tmp_path / "f", "is not a folder")


def test_a_folder_of_iterations_without_a_tracker_names_them(tmp_path):
    write_iteration(tmp_path, "iter_0000100")
    write_iteration(tmp_path, "iter_0000200")
    refused(tmp_path, "is not a Megatron-LM checkpoint", "latest_checkpointed_iteration.txt",
            "iter_0000100, iter_0000200: name one of them")


def test_the_tracker_names_a_missing_iteration_or_holds_garbage(tmp_path):
    write_iteration(tmp_path, "iter_0000100")
    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    tracker.write_text("300")
    refused(tmp_path, "names iter_0000300, which is not in")
    tracker.write_text("latest")
    refused(tmp_path, "holds 'latest'", "not an iteration number or 'release'")


def test_not_a_dist_checkpoint_or_another_backend(tmp_path):
    write_iteration(tmp_path, "iter_0000001", metadata=None)  # the legacy torch format: mp_rank_* folders
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")
    refused(tmp_path, "has no metadata.json", "--ckpt-format torch_dist")
    (tmp_path / "iter_0000001" / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    refused(tmp_path, "the 'zarr' backend")
    (tmp_path / "iter_0000001" / "metadata.json").write_text("{not json")
    refused(tmp_path, "is not valid JSON")


def test_it_is_bad_input():
    assert issubclass(MegatronCheckpointError, ConfigError)  # exit status 2, said once
