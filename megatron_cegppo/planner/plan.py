"""The memory plan of a run: per-GPU bytes of the training phase (the fullest pipeline stage)
and of the generation phase, from a :class:`Config` and the model's HF architecture.

Micro-batches: unpacked, ``algorithm.micro_batch_size`` sequences padded to the longest,
``rollout.max_model_len``; packed (``algorithm.max_tokens_per_microbatch``), one row of the
budget rounded up to a multiple of 8 x TP, as the trainer builds them. How many packed
micro-batches a rank runs per optimizer step, about (its sequences x their mean length) /
budget, depends on the lengths, which the plan cannot know: it assumes every sequence is
``rollout.max_model_len - 1`` tokens long (the worst case: the most micro-batches, so the most
in flight under 1F1B; one sequence per micro-batch for a budget below twice that);
``mean_sequence_tokens`` of :func:`make_plan` gives another length. Each micro-batch's
activations are those of the whole row, whatever it holds."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from megatron_cegppo.config.schema import Config, training_positions
from megatron_cegppo.models.hf_config import HFArchitecture, padded_vocab_size
from megatron_cegppo.config.schema import RECOMPUTE_MODES
from megatron_cegppo.planner.activations import (
    TRANSFORMER_ENGINE,
    LayerImplementation,
    pipeline_in_flight,
    stage_activation_bytes,
)
from megatron_cegppo.planner.generation import GenerationMemory, generation_memory
from megatron_cegppo.planner.logprob import head_buffer_bytes
from megatron_cegppo.planner.parameters import rank_parameters, training_state_bytes

GIB = 1 << 30
# CUDA context, NCCL's buffers and the caching allocator's fragmentation, per GPU
RESERVED_BYTES = 4 * GIB


def read_architecture(cfg: Config) -> HFArchitecture:
    """The model's shape from ``model.architecture`` (an HF config.json), else from
    ``<model.path>/config.json``; only the JSON is read, no weights."""
    path = Path(cfg.model.architecture) if cfg.model.architecture else Path(cfg.model.path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no model architecture at {path}: set model.architecture to an HF config.json "
            "or model.path to a folder holding one"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    try:
        return HFArchitecture.of(SimpleNamespace(**data))
    except AttributeError as exc:
        raise ValueError(f"{path} lacks a field the model needs: {exc}") from None


@dataclass(frozen=True)
class StageMemory:
    """One GPU of a pipeline stage in the training phase."""

    stage: int
    params: int
    grads: int
    optimizer: int
    activations: dict  # recompute mode -> bytes of the stage's layers
    head: int  # final norm, output layer and log-prob/entropy buffers (last stage)
    reference: int  # the frozen reference model's weights (KL term)

    def total(self, recompute: str) -> int:
        return (self.params + self.grads + self.optimizer + self.activations[recompute] + self.head
                + self.reference + RESERVED_BYTES)

    @property
    def resident(self) -> int:
        """What stays on the GPU while vLLM generates."""
        return self.params + self.grads + self.optimizer + self.reference


@dataclass(frozen=True)
class Plan:
    arch: HFArchitecture
    nodes: int
    gpus_per_node: int
    gpu_memory: int
    tp: int
    pp: int
    dp: int
    vpp: Optional[int]
    rollout_tp: int
    sequence_parallel: bool
    recompute: str
    logprob_impl: str
    micro_batch: int
    seq_len: int
    num_microbatches: int
    packed: bool = False  # one row of seq_len tokens per micro-batch (algorithm.max_tokens_per_microbatch)
    sequence_tokens: int = 0  # packed: the length of every sequence num_microbatches assumes
    stages: list = field(default_factory=list)
    generation: Optional[GenerationMemory] = None
    weight_bucket_bytes: int = 0
    problems: list = field(default_factory=list)  # layout problems found while planning

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def training_stage(self) -> StageMemory:
        """The stage that needs the most memory."""
        return max(self.stages, key=lambda s: s.total(self.recompute))

    @property
    def training_total(self) -> int:
        return self.training_stage.total(self.recompute)

    @property
    def resident(self) -> int:
        """The training state that stays on a GPU while vLLM generates (the fullest stage)."""
        return max(s.resident for s in self.stages)

    @property
    def generation_total(self) -> int:
        # weight sync gathers one bucket per rank beside both copies of the weights
        return self.resident + self.generation.budget + 2 * self.weight_bucket_bytes + RESERVED_BYTES

    @property
    def fits(self) -> bool:
        return (not self.problems and self.training_total <= self.gpu_memory
                and self.generation_total <= self.gpu_memory and self.generation.concurrent_sequences >= 1)


def total_parameters(arch: HFArchitecture) -> int:
    """Parameters of the unpadded model (what the model card states)."""
    one = rank_parameters(arch, tp=1, pp=1, stage=0, vocab_divisible_by=1)
    return one.total


def layout_problems(cfg: Config, arch: HFArchitecture, world_size: int) -> list[str]:
    """What of the model's shape the layout cannot split, one message each."""
    p, r = cfg.parallel, cfg.rollout
    tp, pp, vpp = p.tensor, p.pipeline, p.virtual_pipeline or 1
    out = []
    if world_size % (tp * pp):
        out.append(f"{world_size} GPUs do not split into tensor {tp} x pipeline {pp}")
    if arch.num_layers % (pp * vpp):
        out.append(f"{arch.num_layers} layers do not split over pipeline {pp} x virtual pipeline {vpp}")
    if arch.num_heads % tp or arch.num_kv_heads % tp:
        out.append(f"parallel.tensor {tp} does not divide the {arch.num_heads} attention heads and "
                   f"{arch.num_kv_heads} key/value heads")
    if arch.num_heads % r.tensor_parallel:
        out.append(f"rollout.tensor_parallel {r.tensor_parallel} does not divide the {arch.num_heads} attention heads")
    if world_size % r.tensor_parallel:
        out.append(f"{world_size} GPUs do not split into vLLM engines of rollout.tensor_parallel {r.tensor_parallel}")
    if r.max_model_len > arch.max_position_embeddings:
        out.append(f"rollout.max_model_len {r.max_model_len} exceeds the model's max_position_embeddings "
                   f"{arch.max_position_embeddings}")
    return out


def packed_microbatches(*, sequences: int, budget: int, sequence_tokens: int, pp: int = 1,
                        vpp: Optional[int] = None) -> int:
    """Packed micro-batches of one rank per optimizer step when each of its ``sequences`` is
    ``sequence_tokens`` long: ``budget // sequence_tokens`` sequences per micro-batch, none
    split (one per micro-batch for a budget below twice the length). The interleaved schedule
    needs a multiple of ``pp`` (the trainer splits micro-batches until it has one)."""
    if not 1 <= sequence_tokens <= budget:
        raise ValueError(f"a sequence of {sequence_tokens} tokens does not fit a budget of {budget}")
    count = max(1, -(-sequences // (budget // sequence_tokens)))
    if vpp and vpp > 1:
        count = -(-count // pp) * pp
    return count


def make_plan(cfg: Config, arch: HFArchitecture, *, nodes: Optional[int] = None,
              impl: LayerImplementation = TRANSFORMER_ENGINE, mean_sequence_tokens: Optional[int] = None) -> Plan:
    """Per-GPU memory of ``cfg`` on ``nodes`` nodes (default: ``cluster.nodes``).
    ``mean_sequence_tokens``: with packing, the sequences' mean length (prompt + response) for
    the number of micro-batches; default the longest (``config.schema.training_positions``)."""
    p, a, r, c = cfg.parallel, cfg.algorithm, cfg.rollout, cfg.cluster
    nodes = nodes or c.nodes
    world = nodes * max(1, c.gpus_per_node)
    tp, pp = p.tensor, p.pipeline
    problems = layout_problems(cfg, arch, world)
    dp = max(1, world // (tp * pp))
    bf16 = cfg.model.dtype == "bfloat16"
    e = 2 if bf16 else 4
    multiple = 8 * tp
    packed = a.max_tokens_per_microbatch is not None
    if packed:
        # one row of the budget, padded to the TP/SP multiple; the mini-batch's sequences
        # balanced over the DP ranks (by tokens: by count when all are of one length)
        per_rank = -(-(a.prompts_per_step * r.n // a.minibatches) // dp)
        seq, mbs = -(-a.max_tokens_per_microbatch // multiple) * multiple, 1
        sequence_tokens = min(mean_sequence_tokens or training_positions(cfg), a.max_tokens_per_microbatch)
        num_microbatches = packed_microbatches(sequences=per_rank, budget=a.max_tokens_per_microbatch,
                                               sequence_tokens=sequence_tokens, pp=pp, vpp=p.virtual_pipeline)
    else:
        sequence_tokens = 0
        per_rank = a.prompts_per_step * r.n // a.minibatches // dp
        num_microbatches = max(1, per_rank // a.micro_batch_size)
        # the trainer pads a mini-batch to its longest sequence, rounded up to a multiple of 8 x TP
        seq, mbs = -(-(training_positions(cfg) + 1) // multiple) * multiple, a.micro_batch_size
    padded = padded_vocab_size(arch.vocab_size, tp)
    layers = -(-arch.num_layers // pp)  # the fullest stage's, also when they do not divide
    stages = []
    for stage in range(pp):
        params = rank_parameters(arch, tp=tp, pp=pp, stage=stage) if not arch.num_layers % pp else \
            rank_parameters(arch, tp=tp, pp=1, stage=0)
        state = training_state_bytes(params.total, dp=dp, bf16=bf16)
        in_flight = pipeline_in_flight(pp, p.virtual_pipeline, num_microbatches, stage)
        acts = {mode: stage_activation_bytes(arch, layers=layers, seq_len=seq, micro_batch=mbs, tp=tp,
                                             sequence_parallel=p.sequence_parallel, recompute=mode,
                                             in_flight=in_flight, dtype_bytes=e, impl=impl, packed=packed)
                for mode in RECOMPUTE_MODES}
        head = 0
        if stage == pp - 1:
            head = head_buffer_bytes(tokens=seq * mbs, hidden=arch.hidden_size, padded_vocab=padded, tp=tp,
                                     sequence_parallel=p.sequence_parallel, logprob_impl=cfg.model.logprob_impl,
                                     dtype_bytes=e).peak
        reference = params.total * e if a.kl_coeff > 0 else 0
        stages.append(StageMemory(stage=stage, params=state.params, grads=state.grads, optimizer=state.optimizer,
                                  activations=acts, head=head, reference=reference))
    gen = generation_memory(arch, rollout_tp=r.tensor_parallel, world_size=world, gpu_memory=int(c.gpu_memory_gib * GIB),
                            gpu_memory_utilization=r.gpu_memory_utilization,
                            # the prompts of one sampling round are generated at once
                            prompts_per_step=(a.prompts_per_round or a.prompts_per_step) if a.dynamic_sampling
                            else a.prompts_per_step, n=r.n, max_model_len=r.max_model_len)
    return Plan(arch=arch, nodes=nodes, gpus_per_node=c.gpus_per_node, gpu_memory=int(c.gpu_memory_gib * GIB),
                tp=tp, pp=pp, dp=dp, vpp=p.virtual_pipeline, rollout_tp=r.tensor_parallel, sequence_parallel=p.sequence_parallel,
                recompute=p.recompute, logprob_impl=cfg.model.logprob_impl, micro_batch=mbs, seq_len=seq,
                num_microbatches=num_microbatches, packed=packed, sequence_tokens=sequence_tokens, stages=stages,
                generation=gen, weight_bucket_bytes=r.weight_bucket_bytes, problems=problems)
