"""The phases of one step between generation and the update, each a function of named inputs:
advantages (groups -> :class:`StepRollout`), packing (-> this rank's micro-batches of each
mini-batch), and the recompute of the old and reference log-probs into them."""

from __future__ import annotations

import dataclasses

import torch

from megatron_cegppo.algorithms.advantages import grpo_advantages
from megatron_cegppo.config.schema import AlgorithmConfig
from megatron_cegppo.parallel.microbatch import MicroBatch
from megatron_cegppo.platform import Layout

MiniBatches = list  # list[list[MicroBatch]]: this rank's micro-batches of each mini-batch


@dataclasses.dataclass
class StepRollout:
    """A step's trained groups, flattened: one completion per row."""

    completions: list
    prompts: dict  # prompt index -> token ids
    rewards: torch.Tensor  # [groups, n]
    advantages: torch.Tensor  # [completions]
    positive: torch.Tensor  # [completions] bool: reward equal to the reward's correct score
    seq_len: int  # the longest prompt + response, label-aligned, padded to 8 x TP

    def length(self, i: int) -> int:
        """Model positions of completion ``i`` (prompt + response - 1, label-aligned)."""
        c = self.completions[i]
        return len(self.prompts[c.prompt_index]) + len(c.token_ids) - 1


def groups_per_minibatch(algorithm: AlgorithmConfig) -> int:
    """The groups of one mini-batch: a full step's share (a shrunk step has fewer mini-batches
    of this size, not smaller ones)."""
    return algorithm.prompts_per_step // algorithm.minibatches


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def compute_advantages(groups, *, group_size: int, algorithm: AlgorithmConfig, layout: Layout,
                       correct_score: float) -> StepRollout:
    """GRPO advantages of the step's groups (``group_size`` responses each); a response is
    positive when its reward is ``correct_score``."""
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
    completions = [c for g in groups for c in g.completions]
    prompts = {g.prompt_index: g.prompt_ids for g in groups}
    longest = max(len(prompts[c.prompt_index]) + len(c.token_ids) for c in completions) - 1
    return StepRollout(completions=completions, prompts=prompts, rewards=rewards,
                       advantages=grpo_advantages(rewards, group_size, normalize_std=algorithm.normalize_advantage_std),
                       positive=(rewards == correct_score).reshape(-1), seq_len=_round_up(longest, 8 * layout.tp))


def pack_minibatches(rollout: StepRollout, *, algorithm: AlgorithmConfig, layout: Layout, pad_id: int,
                     virtual_pipeline: bool) -> MiniBatches:
    """This rank's micro-batches of each mini-batch, on the model's device. Packed (with
    ``algorithm.max_tokens_per_microbatch``): the mini-batch's sequences balanced over the
    data-parallel ranks by real tokens and packed into rows of the budget (padded to the
    TP/SP multiple); every micro-batch has that one shape, as pipeline schedules need.
    Unpacked: ``micro_batch_size`` rows padded to the step's longest sequence."""
    from megatron_cegppo.algorithms.packing import pack_microbatches, split_to_multiple
    from megatron_cegppo.rollout.batch import build_microbatches

    a, L = algorithm, layout
    common = dict(pad_id=pad_id, seq_len=rollout.seq_len, place=L.platform.place)
    count = max(1, int(rollout.rewards.shape[0]) // groups_per_minibatch(a))
    per_mb = len(rollout.completions) // count
    minibatches = []
    for m in range(count):
        rows = list(range(m * per_mb, (m + 1) * per_mb))
        if a.max_tokens_per_microbatch is None:  # this rank's contiguous share
            per_rank = per_mb // L.dp
            rows = rows[L.dp_rank * per_rank:(L.dp_rank + 1) * per_rank]
            minibatches.append(build_microbatches(
                rollout.prompts, [rollout.completions[i] for i in rows], rollout.advantages[rows],
                positive=rollout.positive[rows], sequence_index=torch.tensor(rows, dtype=torch.long),
                micro_batch_size=a.micro_batch_size, **common))
            continue
        lengths = [rollout.length(i) for i in rows]
        mine = pack_microbatches(lengths, max_tokens=a.max_tokens_per_microbatch, dp_size=L.dp)[L.dp_rank]
        if virtual_pipeline:
            mine = split_to_multiple(mine, lengths, L.pp)
        chosen = sorted(j for pack in mine for j in pack)  # positions in ``rows`` of my sequences
        where = {j: k for k, j in enumerate(chosen)}
        minibatches.append(build_microbatches(
            rollout.prompts, [rollout.completions[rows[j]] for j in chosen],
            rollout.advantages[[rows[j] for j in chosen]], positive=rollout.positive[[rows[j] for j in chosen]],
            sequence_index=torch.tensor([rows[j] for j in chosen], dtype=torch.long),
            packs=[[where[j] for j in pack] for pack in mine],
            packed_tokens=_round_up(a.max_tokens_per_microbatch, 8 * L.tp),
            attention=L.platform.packed_attention, **common))
    return minibatches


def recompute_log_probs(policy, minibatches: MiniBatches, *, algorithm: AlgorithmConfig, layout: Layout) -> dict:
    """The current (old) policy's log-probs, and the reference model's for a KL term, into
    each micro-batch; truncated importance weights into the advantages (``algorithm.tis_cap``);
    returns the train/rollout log-prob mismatch (on the last pipeline stage; ``{}`` elsewhere)."""
    from megatron_cegppo.parallel.pipeline_loss import make_logprob_forward_step
    from megatron_cegppo.rollout.mismatch import logprob_mismatch, truncated_importance_weights

    forward = make_logprob_forward_step(policy.spec)
    for micro in minibatches:
        with torch.no_grad():
            out = policy.schedule(forward, micro, forward_only=True)
        for m, o in zip(micro, out or [{}] * len(micro)):
            m.old_log_prob = o.get("log_prob", torch.zeros_like(m.loss_mask))
        if policy.reference is not None:
            with torch.no_grad():
                ref = policy.schedule(forward, micro, forward_only=True, reference=True)
            for m, o in zip(micro, ref or [{}] * len(micro)):
                m.ref_log_prob = o.get("log_prob", torch.zeros_like(m.loss_mask))
    if not layout.is_last_stage:
        return {}
    every: list[MicroBatch] = [m for micro in minibatches for m in micro]
    mismatch = logprob_mismatch(torch.cat([m.rollout_log_prob for m in every]),
                                torch.cat([m.old_log_prob for m in every]), torch.cat([m.loss_mask for m in every]))
    if algorithm.tis_cap is not None:
        for m in every:
            m.advantages = m.advantages * truncated_importance_weights(m.old_log_prob, m.rollout_log_prob,
                                                                       algorithm.tis_cap)
    return mismatch
