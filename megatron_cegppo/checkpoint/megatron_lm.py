"""A start from a Megatron-LM (or Megatron-Bridge) ``torch_dist`` checkpoint.

The layout, as Megatron-LM's ``megatron/training/checkpointing.py`` writes it: a save folder
holds ``latest_checkpointed_iteration.txt`` (an iteration number, or ``release``) beside
``iter_NNNNNNN/`` (or ``release/``) folders; each of those is a ``dist_checkpointing``
directory (``metadata.json``, ``common.pt``, ``*.distcp``) whose state holds the model under
``model`` (``model0``, ``model1``, ... with virtual pipeline stages), beside the optimizer, the
RNG states and the run's arguments.

Only the model's tensors are read. Their keys are global (the layers stacked on a leading axis,
tensor-parallel shards placed by offset), so a checkpoint saved at one TP/PP/VPP layout loads at
any other. ``common.pt`` (Megatron-LM's pickled arguments) is not read, nor the layers'
``_extra_state`` (transformer-engine's FP8 metadata), which no layer here uses.

Key names. Transformer-engine layer specs fuse the norms into the linear layers
(``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``);
megatron-core's local spec keeps them apart (``input_layernorm``, ``pre_mlp_layernorm``) and
maps them to the fused names when it writes a checkpoint (``get_gpt_layer_local_spec``'s
``sharded_state_dict_keys_map``). A checkpoint written under the local names (without that map)
is read too: :data:`NORM_KEY_ALTERNATIVES` maps each name to the other, in both directions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from megatron_cegppo.config.errors import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
SUPPORTED_BACKEND = "torch_dist"
# the same tensor under the transformer-engine spec's name and the local spec's
_FUSED_NORMS = {
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": "decoder.layers.input_layernorm.weight",
    "decoder.layers.self_attention.linear_qkv.layer_norm_bias": "decoder.layers.input_layernorm.bias",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": "decoder.layers.pre_mlp_layernorm.weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_bias": "decoder.layers.pre_mlp_layernorm.bias",
}
NORM_KEY_ALTERNATIVES = {**_FUSED_NORMS, **{v: k for k, v in _FUSED_NORMS.items()}}
_ITERATION_DIR = re.compile(r"^iter_\d{7,}$")


class MegatronCheckpointError(ConfigError):
    """A Megatron-LM checkpoint that cannot be found, read or fitted to the model (one line;
    bad input, like a config problem)."""


# ---- the layout (torch-free: the preflight reads it) ----------------------------------------


def resolve_iteration_dir(path: str | Path) -> Path:
    """The ``dist_checkpointing`` folder of ``path``: a save folder (its tracker names the
    iteration) or one iteration's folder itself."""
    p = Path(path)
    setting = "model.megatron_checkpoint"
    if not p.exists():
        raise MegatronCheckpointError(f"{setting}: {p} does not exist")
    if not p.is_dir():
        raise MegatronCheckpointError(f"{setting}: {p} is not a folder")
    if (p / "metadata.json").is_file():
        directory = p
    elif (p / TRACKER).is_file():
        directory = p / _iteration_folder(p / TRACKER)
        if not directory.is_dir():
            raise MegatronCheckpointError(f"{setting}: {p / TRACKER} names {directory.name}, which is not in {p}")
    else:
        iterations = sorted(d.name for d in p.iterdir() if d.is_dir() and _ITERATION_DIR.match(d.name))
        hint = f" (it holds {', '.join(iterations[-3:])}: name one of them)" if iterations else ""
        raise MegatronCheckpointError(
            f"{setting}: {p} is not a Megatron-LM checkpoint: neither {TRACKER} nor a dist_checkpointing "
            f"metadata.json{hint}")
    _check_backend(directory)
    return directory


def _iteration_folder(tracker: Path) -> str:
    text = tracker.read_text(errors="replace").strip()
    if text == RELEASE:
        return RELEASE
    if not text.isdigit():
        raise MegatronCheckpointError(
            f"model.megatron_checkpoint: {tracker} holds {text[:40]!r}, not an iteration number or {RELEASE!r}")
    return f"iter_{int(text):07d}"


def _check_backend(directory: Path) -> None:
    metadata = directory / "metadata.json"
    if not metadata.is_file():
        raise MegatronCheckpointError(
            f"model.megatron_checkpoint: {directory} has no metadata.json (not a dist_checkpointing folder; "
            f"save with --ckpt-format {SUPPORTED_BACKEND})")
    try:
        backend = json.loads(metadata.read_text()).get("sharded_backend")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise MegatronCheckpointError(f"model.megatron_checkpoint: {metadata} is not valid JSON") from None
    if backend != SUPPORTED_BACKEND:
        raise MegatronCheckpointError(
            f"model.megatron_checkpoint: {directory} was saved with the {backend!r} backend; only "
            f"{SUPPORTED_BACKEND!r} (--ckpt-format {SUPPORTED_BACKEND}) is read")


# ---- reading the model's tensors ------------------------------------------------------------


def load_megatron_lm_model(chunks, directory: Path, *, vocab_size: int) -> None:
    """Loads this rank's share of the model tensors of ``directory`` (a checkpoint folder of
    :func:`resolve_iteration_dir`) into ``chunks`` (every rank calls it). Refuses, naming the
    first one, a tensor the model needs that the checkpoint lacks or holds in another shape.

    The vocabulary's padding may differ (Megatron-LM pads to a multiple of
    ``make_vocab_size_divisible_by x`` the TP size it ran at): megatron-core reads the rows
    both have (the embedding's and output layer's ``allow_shape_mismatch``), so the checkpoint
    only needs ``vocab_size`` real rows."""
    from megatron.core import dist_checkpointing

    from megatron_cegppo.models.gpt import unwrap_model

    chunks = [unwrap_model(c) for c in chunks]
    saved = dist_checkpointing.load_tensors_metadata(str(directory))
    requests = [_request(chunk.sharded_state_dict(), saved, directory, vocab_size) for chunk in chunks]
    loaded = dist_checkpointing.load({f"model{i}": r for i, r in enumerate(requests)}, str(directory),
                                     common_strategy=_model_only(), strict="assume_ok_unexpected")
    for i, chunk in enumerate(chunks):
        missing, unexpected = chunk.load_state_dict(loaded[f"model{i}"], strict=False)
        # the layers' _extra_state is not read (see the module's docstring); nothing else may be absent
        missing = [k for k in missing if not k.endswith("._extra_state")]
        if missing or unexpected:
            raise MegatronCheckpointError(
                f"model.megatron_checkpoint: {directory} left {(missing or unexpected)[0]} "
                f"{'unset' if missing else 'unknown to the model'}")


def _request(sharded: dict, saved: dict, directory: Path, vocab_size: int) -> dict:
    """The model's sharded state dict, fitted to the checkpoint: extra states left out, each
    tensor under the name the checkpoint uses and in its dtype (cast on loading)."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    request = {}
    for name, item in sharded.items():
        if isinstance(item, ShardedObject) or name.endswith("._extra_state"):
            continue
        key = item.key
        if key not in saved and NORM_KEY_ALTERNATIVES.get(key) in saved:
            item = replace(item, key=NORM_KEY_ALTERNATIVES[key])
            key = item.key
        if key not in saved:
            raise MegatronCheckpointError(
                f"model.megatron_checkpoint: {directory} has no tensor {key}, which the model needs "
                f"(a checkpoint of another architecture, or not a GPT model)")
        built = item.build() if isinstance(item, ShardedTensorFactory) else [item]
        for tensor in (built.values() if isinstance(built, dict) else built):
            want, have = list(tensor.global_shape), list(saved[key].global_shape)
            fits = want == have
            if tensor.allow_shape_mismatch:  # vocabulary rows: padded as each run's TP size wants
                fits = have[1:] == want[1:] and have[0] >= vocab_size
                want = [f">= {vocab_size}", *want[1:]]
            if not fits:
                raise MegatronCheckpointError(
                    f"model.megatron_checkpoint: {key} is {have} in {directory}; the model of model.path's "
                    f"config.json needs {want}".replace("'", ""))
        dtype = saved[key].dtype
        if dtype != item.data.dtype:
            data = item.data.new_empty(item.data.shape, dtype=dtype)
            item = replace(item, data=data) if isinstance(item, ShardedTensorFactory) else replace(
                item, data=data, dtype=dtype)
        request[name] = item
    return request


def _model_only():
    """A common-state strategy that reads nothing: ``common.pt`` holds Megatron-LM's arguments,
    pickled with classes that ``torch.load``'s safe default refuses, and a start needs none of
    them."""
    from megatron.core.dist_checkpointing.strategies.base import LoadCommonStrategy

    class ModelOnly(LoadCommonStrategy):
        def load_common(self, checkpoint_dir):
            return {}

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            return sharded_objects_state_dict  # none are requested (see _request)

        def check_backend_compatibility(self, loaded_backend):
            pass

        def check_version_compatibility(self, loaded_version):
            pass

    return ModelOnly()
