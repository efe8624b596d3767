"""A tiny Qwen2-shaped megatron-core configuration (RoPE, GQA, SwiGLU, RMSNorm, QKV bias) for
the tests and the CPU demo, and the demo's run config.

The run config ships inside the package (``testing/tiny_cpu.yaml``, the same file as
``configs/tiny_cpu.yaml``), so that it is found from any working directory and from a wheel."""

from __future__ import annotations

from importlib import resources
from typing import Iterable, Optional

import torch

TINY_CONFIG = resources.files(__package__) / "tiny_cpu.yaml"


def tiny_gpt_config(
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    sequence_parallel: bool = False,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_query_groups: int = 2,
    ffn_hidden_size: int = 96,
):
    """fp32, no dropout, CPU-initialised (the full weight is built and then split, so the
    weights do not depend on the layout), batched p2p as the platform allows."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    from megatron_cegppo.platform import current_platform

    return TransformerConfig(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups, ffn_hidden_size=ffn_hidden_size,
        kv_channels=hidden_size // num_attention_heads, normalization="RMSNorm",
        layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sequence_parallel,
        batch_p2p_comm=current_platform().batch_p2p_comm,
    )


def save_tiny_task_model(folder) -> None:
    """An untrained tiny Qwen2 model with the demo's tokenizer, as an HF folder."""
    from transformers import Qwen2ForCausalLM

    from megatron_cegppo.demo.tokenizer import load_task_tokenizer, train_task_tokenizer
    from megatron_cegppo.demo.warmup import tiny_qwen2_config

    train_task_tokenizer(str(folder))
    tokenizer = load_task_tokenizer(str(folder))
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_qwen2_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def prepare_tiny_run(folder, prompts: int = 64, seed: int = 1) -> list[str]:
    """An untrained tiny task model and a prompt file in ``folder``, and the overrides that
    point the demo's config (:func:`load_tiny_config`) at them."""
    from pathlib import Path

    from megatron_cegppo.demo.prepare import write_prompts

    folder = Path(folder)
    save_tiny_task_model(folder / "model")
    write_prompts(folder / "prompts.jsonl", prompts, seed=seed)
    return [f"model.path={folder / 'model'}", f"data.train_path={folder / 'prompts.jsonl'}"]


def load_tiny_config(overrides: Iterable[str] = ()):
    """The demo's config (``configs/tiny_cpu.yaml``) with ``overrides``, not yet validated."""
    from megatron_cegppo.config import load_config

    with resources.as_file(TINY_CONFIG) as path:
        return load_config(path, overrides)


def fit_tiny_trainer(overrides, world: int):
    """``(trainer, history)``: a Trainer of the demo's config with ``overrides``, after
    ``fit()`` (call it on every rank)."""
    from megatron_cegppo.config import validate
    from megatron_cegppo.trainer.loop import Trainer

    trainer = Trainer(validate(load_tiny_config(overrides), world))
    return trainer, trainer.fit()
