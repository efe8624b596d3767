"""Hugging Face (Qwen2 / Llama) <-> megatron-core GPTModel parameter mapping, on full
(unsharded) tensors. Table-driven: one row per megatron parameter, naming the HF tensors it
is made of and how (copied, q/k/v interleaved per query group, gate/up stacked).

Names are megatron's local-spec names with global layer numbers; transformer-engine's fused
layer-norm names are mapped onto them by :func:`canonical_name`.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Mapping, Optional

import torch

from megatron_cegppo.models.hf_config import HFArchitecture

_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def canonical_name(name: str) -> str:
    """A transformer-engine spec parameter name in local-spec terms."""
    for te, local in _TE_ALIASES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def _merge_qkv(arch: HFArchitecture, q, k, v):
    """Megatron's QKV rows: for each query group, its query heads, then its key, then its value."""
    groups, d = arch.num_kv_heads, arch.head_dim
    rest = q.shape[1:]
    q = q.reshape(groups, (arch.num_heads // groups) * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _split_qkv(arch: HFArchitecture, qkv):
    groups, d = arch.num_kv_heads, arch.head_dim
    per_group = (arch.num_heads // groups) * d
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, per_group + 2 * d, *rest)
    q, k, v = torch.split(grouped, [per_group, d, d], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def _copy(arch, t):
    return t


def _unpack(arch, t):
    return [t]


def _stack(arch, gate, up):
    return torch.cat([gate, up], dim=0)


def _unstack(arch, t):
    return list(torch.chunk(t, 2, dim=0))


# (megatron name pattern, HF name patterns, merge, split); "{L}" is the global layer index.
_LAYER_RULES = [
    ("decoder.layers.{L}.input_layernorm.weight", ["model.layers.{L}.input_layernorm.weight"], _copy, _unpack),
    ("decoder.layers.{L}.self_attention.linear_qkv.weight",
     ["model.layers.{L}.self_attn.q_proj.weight", "model.layers.{L}.self_attn.k_proj.weight",
      "model.layers.{L}.self_attn.v_proj.weight"], _merge_qkv, _split_qkv),
    ("decoder.layers.{L}.self_attention.linear_qkv.bias",
     ["model.layers.{L}.self_attn.q_proj.bias", "model.layers.{L}.self_attn.k_proj.bias",
      "model.layers.{L}.self_attn.v_proj.bias"], _merge_qkv, _split_qkv),
    ("decoder.layers.{L}.self_attention.linear_proj.weight", ["model.layers.{L}.self_attn.o_proj.weight"], _copy, _unpack),
    ("decoder.layers.{L}.pre_mlp_layernorm.weight", ["model.layers.{L}.post_attention_layernorm.weight"], _copy, _unpack),
    ("decoder.layers.{L}.mlp.linear_fc1.weight",
     ["model.layers.{L}.mlp.gate_proj.weight", "model.layers.{L}.mlp.up_proj.weight"], _stack, _unstack),
    ("decoder.layers.{L}.mlp.linear_fc2.weight", ["model.layers.{L}.mlp.down_proj.weight"], _copy, _unpack),
]
_VOCAB_ROWS = {"embedding.word_embeddings.weight", "output_layer.weight"}


def _rules(arch: HFArchitecture) -> Iterator[tuple[str, list[str], Callable, Callable]]:
    yield "embedding.word_embeddings.weight", ["model.embed_tokens.weight"], _copy, _unpack
    for layer in range(arch.num_layers):
        for mcore, hf, merge, split in _LAYER_RULES:
            if mcore.endswith("linear_qkv.bias") and not arch.qkv_bias:
                continue
            yield (mcore.format(L=layer), [h.format(L=layer) for h in hf], merge, split)
    yield "decoder.final_layernorm.weight", ["model.norm.weight"], _copy, _unpack
    if not arch.tie_word_embeddings:
        yield "output_layer.weight", ["lm_head.weight"], _copy, _unpack


def megatron_names(arch: HFArchitecture) -> list[str]:
    return [name for name, *_ in _rules(arch)]


def hf_to_megatron(
    hf_state: Mapping[str, torch.Tensor], arch: HFArchitecture, padded_vocab: int
) -> dict[str, torch.Tensor]:
    """Full megatron tensors from an HF state dict; vocabulary rows padded with zeros."""
    missing = [h for _, hf, *_ in _rules(arch) for h in hf if h not in hf_state]
    if missing:
        raise ValueError(f"the HF weights lack {len(missing)} tensor(s) the config needs, e.g. {missing[:3]}")
    out = {}
    for name, hf_names, merge, _ in _rules(arch):
        tensor = merge(arch, *[hf_state[h] for h in hf_names])
        if name in _VOCAB_ROWS:
            tensor = _pad_rows(tensor, padded_vocab)
        out[name] = tensor
    return out


def megatron_to_hf(name: str, tensor: torch.Tensor, arch: HFArchitecture) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors one full megatron parameter stands for (padding rows dropped)."""
    name = canonical_name(name)
    rule = _rules_by_name(arch).get(name)
    if rule is None:
        raise KeyError(f"no HF counterpart for megatron parameter {name!r}")
    _, hf_names, _, split = rule
    if name in _VOCAB_ROWS:
        tensor = tensor[: arch.vocab_size]
    return list(zip(hf_names, split(arch, tensor)))


@functools.lru_cache(maxsize=8)
def _rules_by_name(arch: HFArchitecture) -> dict[str, tuple]:
    return {rule[0]: rule for rule in _rules(arch)}


def hf_shapes(arch: HFArchitecture) -> dict[str, tuple[int, ...]]:
    """The shape the config implies for every HF tensor the mapping reads."""
    return dict(_hf_shapes_cached(arch))


@functools.lru_cache(maxsize=8)
def _hf_shapes_cached(arch: HFArchitecture) -> dict[str, tuple[int, ...]]:
    hidden, d = arch.hidden_size, arch.head_dim
    q, kv, ffn = arch.num_heads * d, arch.num_kv_heads * d, arch.ffn_hidden_size
    by_suffix = {
        "embed_tokens.weight": (arch.vocab_size, hidden), "lm_head.weight": (arch.vocab_size, hidden),
        "norm.weight": (hidden,), "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "q_proj.weight": (q, hidden), "k_proj.weight": (kv, hidden), "v_proj.weight": (kv, hidden),
        "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.weight": (hidden, q),
        "gate_proj.weight": (ffn, hidden), "up_proj.weight": (ffn, hidden), "down_proj.weight": (hidden, ffn),
    }
    shapes = {}
    for _, hf_names, *_ in _rules(arch):
        for hf in hf_names:
            suffix = next(k for k in by_suffix if hf == k or hf.endswith("." + k))
            shapes[hf] = by_suffix[suffix]
    return shapes


# A full megatron tensor as a run of dim-0 row ranges of HF tensors: (HF name, start, stop),
# with None for the zero rows that pad the vocabulary. Each mirrors the merge of its rule.
Rows = list[tuple[Optional[str], int, int]]


def _copy_rows(arch, shapes, name) -> Rows:
    return [(name, 0, shapes[name][0])]


def _qkv_rows(arch, shapes, q, k, v) -> Rows:
    d = arch.head_dim
    per_group = (arch.num_heads // arch.num_kv_heads) * d
    rows: Rows = []
    for g in range(arch.num_kv_heads):
        rows += [(q, g * per_group, (g + 1) * per_group), (k, g * d, (g + 1) * d), (v, g * d, (g + 1) * d)]
    return rows


def _stack_rows(arch, shapes, gate, up) -> Rows:
    return [(gate, 0, shapes[gate][0]), (up, 0, shapes[up][0])]


_ROW_LAYOUTS = {_copy: _copy_rows, _merge_qkv: _qkv_rows, _stack: _stack_rows}


def hf_row_layout(name: str, arch: HFArchitecture, padded_vocab: int) -> Rows:
    """Where each dim-0 row of the full megatron tensor ``name`` comes from: the rows
    :func:`hf_to_megatron` builds, as ``(HF name or None for zeros, start, stop)`` ranges."""
    name = canonical_name(name)
    rule = _rules_by_name(arch).get(name)
    if rule is None:
        raise KeyError(f"no HF counterpart for megatron parameter {name!r}")
    _, hf_names, merge, _ = rule
    rows = _ROW_LAYOUTS[merge](arch, _hf_shapes_cached(arch), *hf_names)
    if name in _VOCAB_ROWS:
        if padded_vocab < arch.vocab_size:
            raise ValueError(f"vocabulary of {arch.vocab_size} rows exceeds the padded size {padded_vocab}")
        if padded_vocab > arch.vocab_size:
            rows.append((None, 0, padded_vocab - arch.vocab_size))
    return rows


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] > rows:
        raise ValueError(f"vocabulary of {tensor.shape[0]} rows exceeds the padded size {rows}")
    if tensor.shape[0] == rows:
        return tensor
    pad = tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, pad])
