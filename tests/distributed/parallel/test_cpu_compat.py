"""Each CPU workaround for megatron-core is needed (megatron fails without it) and sufficient
(the same megatron operation works with every workaround applied). Each case runs in fresh
processes, since the patches are process-wide."""

from __future__ import annotations

import pytest
import torch

from megatron_cegppo.cpu_compat import PATCH_NAMES
from megatron_cegppo.testing.multiprocess import run_distributed
from megatron_cegppo.testing.tiny import tiny_gpt_config

pytestmark = pytest.mark.distributed


def _config(tp=1, pp=1, sp=False, batch_p2p=False):
    config = tiny_gpt_config(tp, pp, sequence_parallel=sp, num_layers=2, hidden_size=32,
                             num_attention_heads=2, num_query_groups=1, ffn_hidden_size=64)
    config.batch_p2p_comm = batch_p2p
    return config


def _build(config, tied=False):
    from megatron_cegppo.models import build_gpt_model_chunks

    return build_gpt_model_chunks(config, vocab_size=64, max_sequence_length=8,
                                  share_embeddings_and_output_weights=tied)


def _train_step(config, chunks):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch = dict(ids=torch.randint(0, 64, (2, 8)), pos=torch.arange(8).expand(2, 8))

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["ids"], b["pos"], None)
        return out, lambda o: (o.float().square().mean(), {})

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch, batch]), model=chunks[0],
        num_microbatches=2, seq_length=8, micro_batch_size=2,
    )


# The megatron operation that needs each workaround, and the layout it needs.
def _op_current_device(config):  # RotaryEmbedding.forward: inv_freq.to(current_device())
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1)
    (model,) = _build(config)
    model(torch.randint(0, 64, (2, 8)), torch.arange(8).expand(2, 8), None)


def _op_rng(config):  # CudaRNGStatesTracker.add via model_parallel_cuda_manual_seed
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1)


def _op_hardcoded(config):  # forward_backward_no_pipelining: torch.zeros(device="cuda")
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1)
    _train_step(config, _build(config))


def _op_tensor_cuda(config):  # LanguageModule.setup_embeddings_and_output_layer: .cuda()
    _build(config, tied=True)


def _op_synchronize(config):  # p2p_communication._communicate with batched p2p
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1)
    _train_step(config, _build(config))


def _op_sp_norm(config):  # WrappedTorchNorm.__new__ asserts not sequence_parallel
    _build(config)


def _op_cuda_type_checks(config):  # DistributedOptimizer construction, clip_grad_by_total_norm_fp32
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.config.schema import OptimConfig
    from megatron_cegppo.trainer.optim import build_optimizer

    model_parallel_cuda_manual_seed(1)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True),
                                  _build(config)[0])
    optimizer = build_optimizer(OptimConfig(lr=1e-3, grad_clip=1e-3), [ddp], bf16=False)
    _train_step(config, [ddp])
    optimizer.step()


OPERATIONS = {
    "current_device": (_op_current_device, dict()),
    "rng": (_op_rng, dict()),
    "hardcoded_cuda_modules": (_op_hardcoded, dict()),
    "tensor_cuda": (_op_tensor_cuda, dict(pp=2)),
    "synchronize": (_op_synchronize, dict(pp=2, batch_p2p=True)),
    "sequence_parallel_torch_norm": (_op_sp_norm, dict(tp=2, sp=True)),
    "cuda_type_checks": (_op_cuda_type_checks, dict()),
}


def worker(rank, world, patch, exclude):
    from megatron.core import parallel_state

    from megatron_cegppo.cpu_compat import apply_cpu_compat

    apply_cpu_compat(exclude=exclude)
    op, layout = OPERATIONS[patch]
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.get("tp", 1), pipeline_model_parallel_size=layout.get("pp", 1)
    )
    try:
        op(_config(**layout))
    except Exception as exc:  # noqa: BLE001 - the failure is the result
        return f"{type(exc).__name__}: {exc}"
    return None


def test_every_patch_has_an_operation():
    assert set(OPERATIONS) == set(PATCH_NAMES)


@pytest.mark.parametrize("patch", list(OPERATIONS))
def test_patch_is_needed_and_sufficient(patch):
    layout = OPERATIONS[patch][1]
    world = layout.get("tp", 1) * layout.get("pp", 1)
    with_all = run_distributed(worker, world, patch, (), timeout=300)
    assert with_all == [None] * world, f"{patch}: fails even with every workaround: {with_all}"
    without = run_distributed(worker, world, patch, (patch,), timeout=300)
    assert all(err is not None for err in without), (
        f"megatron no longer needs the {patch!r} workaround: remove it"
    )
