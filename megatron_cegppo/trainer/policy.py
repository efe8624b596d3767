"""The policy as the trainer holds it: megatron-core GPT chunks built from a Hugging Face
folder, wrapped in DDP, with the distributed optimizer, the frozen reference for a KL term and
the loss spec; and the one way to run a pipeline schedule over them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from megatron_cegppo.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_cegppo.parallel.microbatch import MicroBatch


@dataclass
class Policy:
    arch: object  # models.GPTArch: the shapes, as checkpoints record them
    tconfig: object  # megatron's TransformerConfig
    model: list  # DDP-wrapped chunks: one, or one per virtual pipeline stage
    optimizer: object  # megatron's distributed optimizer over ``model``
    reference: Optional[list]  # the starting policy, frozen (KL term only)
    spec: object  # parallel.pipeline_loss.PolicyLossSpec

    def parameters(self) -> Iterator[torch.Tensor]:
        return (p for chunk in self.model for p in chunk.parameters())

    def grad_buffers(self) -> list:
        """The gradients as megatron's DDP keeps them: a few flat buffers per model chunk."""
        flat = [b.grad_data for chunk in self.model for b in getattr(chunk, "buffers", [])]
        return flat or [p.main_grad for chunk in self.model for p in chunk.parameters()]

    def zero_grad(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def schedule(self, forward_step: Callable, microbatches: list[MicroBatch], *, forward_only: bool = False,
                 reference: bool = False):
        """megatron's forward(-backward) schedule for this layout over ``microbatches`` (of the
        policy, or of the reference model); the last stage's per-micro-batch outputs."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        chunks = self.reference if reference else self.model
        model = chunks if len(chunks) > 1 else chunks[0]
        data = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
        rows, tokens = microbatches[0].input_ids.shape  # one shape per call: p2p buffers are sized by it
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=model,
            num_microbatches=len(microbatches), seq_length=tokens, micro_batch_size=rows,
            forward_only=forward_only,
        )


def build_policy(model_cfg: ModelConfig, parallel: ParallelConfig, algorithm: AlgorithmConfig,
                 optim: OptimConfig, *, temperature: float, seed: int) -> Policy:
    """This rank's share of the policy: only its slices of its stage's tensors are read from
    ``model_cfg.path``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.losses import loss_kwargs
    from megatron_cegppo.models import build_gpt_from_hf, read_hf_config
    from megatron_cegppo.parallel.pipeline_loss import PolicyLossSpec
    from megatron_cegppo.trainer.optim import build_optimizer

    model_parallel_cuda_manual_seed(seed)
    bf16 = model_cfg.dtype == "bfloat16"
    hf_config = read_hf_config(model_cfg.path)
    start = _starting_weights(model_cfg)

    def build():
        # bf16: parameters and activations in bf16, fp32 master weights in the optimizer
        # (build_optimizer), gradients reduced in fp32 (ddp_config below). No megatron
        # Float16Module: the parameters are built in bf16 already, the inputs are token
        # ids, and its one other effect, casting the last stage's output to fp32, would
        # materialize [tokens, V/TP] fp32 logits, where the loss upcasts chunk by chunk.
        return build_gpt_from_hf(
            hf_config, tp=parallel.tensor, pp=parallel.pipeline, vpp=parallel.virtual_pipeline,
            sequence_parallel=parallel.sequence_parallel, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            recompute=parallel.recompute,
        )

    arch, tconfig, chunks, padded = build()
    start.load(chunks, arch, padded)
    reference = None
    if algorithm.kl_coeff > 0:
        _, _, reference, _ = build()
        start.load(reference, arch, padded)
        for chunk in reference:
            chunk.requires_grad_(False)
    tconfig.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = [DistributedDataParallel(tconfig, ddp_config, c) for c in chunks]
    a = algorithm
    spec = PolicyLossSpec(loss=a.loss, loss_kwargs=loss_kwargs(a.loss, a), loss_agg_mode=a.loss_agg_mode,
                          temperature=temperature, vocab_size=arch.vocab_size, logprob_impl=model_cfg.logprob_impl,
                          entropy_coeff=a.entropy_coeff, kl_coeff=a.kl_coeff,
                          positive_loss_coeff=a.positive_loss_coeff)
    return Policy(arch=arch, tconfig=tconfig, model=model, optimizer=build_optimizer(optim, model, bf16=bf16),
                  reference=reference, spec=spec)


@dataclass
class StartingWeights:
    """Where a fresh policy's weights come from: the HF folder, or a Megatron-LM checkpoint."""

    hf_folder: str
    megatron_dir: Optional[object] = None  # pathlib.Path of the checkpoint's iteration folder

    def load(self, chunks: list, arch, padded_vocab: int) -> None:
        """This rank's slices of its stage's tensors, into ``chunks``."""
        if self.megatron_dir is not None:
            from megatron_cegppo.checkpoint.megatron_lm import load_megatron_lm_model

            load_megatron_lm_model(chunks, self.megatron_dir, vocab_size=arch.vocab_size)
        else:
            from megatron_cegppo.models import import_hf_weights

            import_hf_weights(chunks, self.hf_folder, arch, padded_vocab)


def _starting_weights(model_cfg: ModelConfig) -> StartingWeights:
    if not model_cfg.megatron_checkpoint:
        return StartingWeights(model_cfg.path)
    from megatron_cegppo.checkpoint.megatron_lm import resolve_iteration_dir

    return StartingWeights(model_cfg.path, resolve_iteration_dir(model_cfg.megatron_checkpoint))
