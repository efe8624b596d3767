"""The logits of a megatron GPT model over the whole (unpadded) vocabulary, through megatron's
pipeline schedule at any TP/PP layout, for comparisons with HF transformers."""

from __future__ import annotations

from typing import Optional

import torch


def forward_logits(model, tokens: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
    """``[batch, tokens, vocab_size]`` logits of ``model`` (this rank's chunk) on the last
    pipeline stage, its tensor-parallel vocabulary shards gathered; ``None`` on other stages.
    Every rank of the model calls it."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    collected = []

    def forward_step(data_iterator, chunk):
        t = next(data_iterator)
        output = chunk(t, torch.arange(t.shape[1]).expand_as(t), None)

        def loss_func(logits):
            collected.append(logits.detach())
            return logits.sum() * 0, {}
        return output, loss_func

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]), model=model,
                                    num_microbatches=1, seq_length=tokens.shape[1],
                                    micro_batch_size=tokens.shape[0], forward_only=True)
    if not collected:
        return None
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(collected[0]) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(shards, collected[0], group=group)
    return torch.cat(shards, dim=-1)[..., :vocab_size]
