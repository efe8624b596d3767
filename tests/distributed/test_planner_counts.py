"""The planner's per-rank parameter counts equal megatron-core's modules at several layouts,
and its optimizer-state bytes equal what megatron's distributed optimizer allocates."""

from __future__ import annotations

import pytest

from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed


def hf_config(tied):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       num_hidden_layers=4, intermediate_size=96, vocab_size=1000,
                       max_position_embeddings=32, tie_word_embeddings=tied)


def worker(rank, world, tp, pp, tied):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.config.schema import OptimConfig
    from megatron_cegppo.models import build_gpt_from_hf
    from megatron_cegppo.cpu_compat import apply_cpu_compat
    from megatron_cegppo.trainer.optim import build_optimizer

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(0)
    _, config, chunks, _ = build_gpt_from_hf(hf_config(tied), tp=tp, pp=pp)
    numel = sum(p.numel() for p in chunks[0].parameters())
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True), chunks[0])
    opt = build_optimizer(OptimConfig(), [ddp], bf16=False)
    from megatron_cegppo.checkpoint.optimizer_compat import materialize_adam_state

    materialize_adam_state(opt)  # the state Adam allocates at its first step
    inner = opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") else opt.optimizer
    state_bytes = sum(t.numel() * t.element_size() for s in inner.state.values()
                      for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
    return parallel_state.get_pipeline_model_parallel_rank(), numel, state_bytes, parallel_state.get_data_parallel_world_size()


@pytest.mark.parametrize("tp,pp,dp,tied", [(1, 1, 1, False), (2, 1, 1, False), (1, 2, 1, False), (1, 2, 1, True),
                                           (1, 1, 1, True), (1, 1, 2, False)])
def test_parameter_and_optimizer_counts_match_megatron(tp, pp, dp, tied):
    from megatron_cegppo.models.hf_config import HFArchitecture
    from megatron_cegppo.planner import rank_parameters, training_state_bytes

    arch = HFArchitecture.of(hf_config(tied))
    by_stage: dict[int, list[int]] = {}
    for stage, numel, state_bytes, got_dp in run_distributed(worker, tp * pp * dp, tp, pp, tied, timeout=300):
        assert got_dp == dp
        planned = rank_parameters(arch, tp=tp, pp=pp, stage=stage)
        assert planned.total == numel, (stage, planned, numel)
        by_stage.setdefault(stage, []).append(state_bytes)
    for stage, states in by_stage.items():
        numel = rank_parameters(arch, tp=tp, pp=pp, stage=stage).total
        # fp32 params: exp_avg and exp_avg_sq of the DP shard; the largest shard is planned
        # (the last shard also holds the bucket's padding, which has no optimizer state)
        assert max(states) == training_state_bytes(numel, dp=dp, bf16=False).optimizer, states
