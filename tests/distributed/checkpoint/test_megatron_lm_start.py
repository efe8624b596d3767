"""A policy started from a Megatron-LM ``torch_dist`` checkpoint (``model.megatron_checkpoint``)
computes HF transformers' logits of the same weights, at TP1 and at TP2 x PP2.

The checkpoint is written by megatron-core itself, in Megatron-LM's layout (a save folder with
``latest_checkpointed_iteration.txt`` beside ``iter_0000007/``; the model under ``model``
beside the run's arguments, an optimizer tensor, the iteration and the checkpoint version),
at TP2 (with another vocabulary padding than the readers'), in bf16, with transformer-engine-style
``_extra_state`` payloads, and with the norms under the transformer-engine names (what
megatron-core writes) or under the local spec's. The HF folder the policy is pointed at holds
other weights (the base model): only the checkpoint can give the reference logits."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_cegppo.testing.multiprocess import run_distributed

pytestmark = pytest.mark.distributed

VOCAB = 100
ITERATION = 7
WRITER_VOCAB_DIVISIBLE_BY = 192  # 384 rows at TP2, where the readers pad to 128 (TP1) or 256 (TP2)
# the fused norms' names in transformer-engine layer specs, and the local spec's own names
TE_NORM_KEYS = {
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": "decoder.layers.input_layernorm.weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": "decoder.layers.pre_mlp_layernorm.weight",
}


def _save_qwen2(folder, *, layers: int, seed: int, bf16_exact: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_hidden_layers=layers, intermediate_size=96, vocab_size=VOCAB, rms_norm_eps=1e-6,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         rope_parameters={"rope_theta": 5000.0, "rope_type": "default"})
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # so that a mis-mapped norm or bias shows
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
            if bf16_exact:  # the checkpoint stores bf16: the same numbers in both
                p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(folder)
    return model


def write_megatron_lm_checkpoint(rank, world, hf_folder, save_dir, norm_names):
    """Megatron-LM's torch_dist save of the HF folder's weights, at TP2."""
    from pathlib import Path

    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_cegppo.cpu_compat import apply_cpu_compat
    from megatron_cegppo.models import build_gpt_from_hf, import_hf_weights, read_hf_config, read_hf_state

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    model_parallel_cuda_manual_seed(0)
    arch, _, chunks, padded = build_gpt_from_hf(read_hf_config(hf_folder), tp=world, pp=1,
                                                vocab_divisible_by=WRITER_VOCAB_DIVISIBLE_BY)
    import_hf_weights(chunks, read_hf_state(hf_folder), arch, padded)
    model = chunks[0].sharded_state_dict()
    for item in model.values():
        if isinstance(item, ShardedObject):
            item.data = torch.arange(16, dtype=torch.uint8)  # as transformer-engine serializes FP8 metadata
            continue
        item.data = item.data.detach().to(torch.bfloat16)
        if isinstance(item, ShardedTensor):
            item.dtype = torch.bfloat16
        if norm_names == "local" and item.key in TE_NORM_KEYS:
            item.key = TE_NORM_KEYS[item.key]
    assert any(item.key in TE_NORM_KEYS.values() if norm_names == "local" else item.key in TE_NORM_KEYS
               for item in model.values()), "the norms are not named as the test means"
    optimizer = {"param_groups": [{"lr": 1e-6}],
                 "state": ShardedTensor.from_rank_offsets("optimizer.distributed.dp_group_idx_0.exp_avg",
                                                          torch.full((4,), float(rank)), (0, rank, world))}
    state = {"model": model, "optimizer": optimizer, "iteration": ITERATION, "checkpoint_version": 3.0,
             "args": argparse.Namespace(tensor_model_parallel_size=world, num_layers=arch.num_layers,
                                        make_vocab_size_divisible_by=WRITER_VOCAB_DIVISIBLE_BY, ckpt_format="torch_dist")}
    iteration_dir = Path(save_dir) / f"iter_{ITERATION:07d}"
    if rank == 0:
        iteration_dir.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, str(iteration_dir))
    if rank == 0:
        (Path(save_dir) / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    return padded


def start_policy_and_forward(rank, world, hf_folder, megatron_checkpoint, tp, pp, tokens):
    """The policy as the trainer builds it, started from ``megatron_checkpoint``; the last
    stage's logits over the real vocabulary."""
    from megatron.core import parallel_state

    from megatron_cegppo.config.schema import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_cegppo.cpu_compat import apply_cpu_compat
    from megatron_cegppo.models.gpt import unwrap_model
    from megatron_cegppo.testing.logits import forward_logits
    from megatron_cegppo.trainer.policy import build_policy

    apply_cpu_compat()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    policy = build_policy(ModelConfig(path=hf_folder, megatron_checkpoint=megatron_checkpoint),
                          ParallelConfig(tensor=tp, pipeline=pp), AlgorithmConfig(), OptimConfig(),
                          temperature=1.0, seed=0)
    logits = forward_logits(policy.model[0], tokens, VOCAB)
    if logits is None:
        return None
    return logits, unwrap_model(policy.model[0]).output_layer.weight.shape[0] * tp  # the padded vocabulary


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_lm")
    _save_qwen2(root / "base", layers=4, seed=1, bf16_exact=False)  # what model.path holds
    sft = _save_qwen2(root / "sft", layers=4, seed=2, bf16_exact=True)  # what the checkpoints hold
    _save_qwen2(root / "shallow", layers=2, seed=3, bf16_exact=True)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = sft(tokens).logits
    saves = {}
    for names in ("te", "local"):
        saves[names] = str(root / f"save_{names}")
        padded = run_distributed(write_megatron_lm_checkpoint, 2, str(root / "sft"), saves[names], names)[0]
    saves["shallow"] = str(root / "save_shallow")
    run_distributed(write_megatron_lm_checkpoint, 2, str(root / "shallow"), saves["shallow"], "te")
    return {"root": root, "base": str(root / "base"), "saves": saves, "tokens": tokens, "reference": reference,
            "saved_padding": padded}


@pytest.mark.parametrize("names,tp,pp", [("te", 1, 1), ("te", 2, 2), ("local", 1, 1)],
                         ids=["te-names-tp1", "te-names-tp2pp2", "local-names-tp1"])
def test_start_from_megatron_lm_checkpoint_gives_hf_logits(models, names, tp, pp):
    ranks = run_distributed(start_policy_and_forward, tp * pp, models["base"], models["saves"][names], tp, pp,
                            models["tokens"], timeout=300)
    got = [r for r in ranks if r is not None]
    assert len(got) == tp  # the last stage's ranks
    for logits, padding in got:
        assert padding != models["saved_padding"], "the readers should pad the vocabulary otherwise than the writer"
        err = (logits - models["reference"]).abs().max().item()
        assert err <= 1e-4, f"{names} names at TP{tp} PP{pp}: logits differ from HF by {err:.3g}"


def test_the_iteration_folder_itself_is_accepted(models):
    folder = f"{models['saves']['te']}/iter_{ITERATION:07d}"
    (logits, _), = run_distributed(start_policy_and_forward, 1, models["base"], folder, 1, 1, models["tokens"])
    assert (logits - models["reference"]).abs().max().item() <= 1e-4


def test_a_checkpoint_of_another_shape_is_refused_naming_the_tensor(models):
    with pytest.raises(RuntimeError) as failure:
        run_distributed(start_policy_and_forward, 1, models["base"], models["saves"]["shallow"], 1, 1,
                        models["tokens"])
    message = str(failure.value)
    assert "MegatronCheckpointError" in message, message
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight is [2, 64]" in message, message
    assert "needs [4, 64]" in message, message


def fit_one_step(rank, world, overrides):
    from megatron_cegppo.testing.tiny import fit_tiny_trainer

    trainer, history = fit_tiny_trainer(overrides, world)
    return history


def test_a_training_run_starts_from_the_checkpoint(tmp_path):
    """The tiny task's trainer (TP2, vLLM engines fed by the first weight push) started from a
    Megatron-LM checkpoint of weights W, with model.path holding other weights, runs its first
    step exactly as a run started from an HF folder of W."""
    import shutil

    from transformers import AutoModelForCausalLM

    from megatron_cegppo.testing.tiny import prepare_tiny_run

    overrides = prepare_tiny_run(tmp_path)
    base = tmp_path / "model"
    sft = tmp_path / "sft"
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():  # W: other weights than model.path's, exact in bf16
            p.add_(torch.randn_like(p) * 0.02).copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(sft)
    for f in base.iterdir():
        if "token" in f.name:
            shutil.copy(f, sft / f.name)
    run_distributed(write_megatron_lm_checkpoint, 2, str(sft), str(tmp_path / "save"), "te")
    common = [o for o in overrides if not o.startswith("model.path")] + [
        "trainer.steps=1", "algorithm.prompts_per_step=8", "algorithm.micro_batch_size=8", "rollout.n=4"]
    from_hf = run_distributed(fit_one_step, 2, common + [f"model.path={sft}", f"trainer.run_dir={tmp_path / 'a'}"])
    from_megatron = run_distributed(fit_one_step, 2, common + [
        f"model.path={base}", f"model.megatron_checkpoint={tmp_path / 'save'}", f"trainer.run_dir={tmp_path / 'b'}"])
    same = {k: v for k, v in from_hf[0][0].items() if not k.startswith(("time/", "tokens_per_second"))}
    assert {k: from_megatron[0][0][k] for k in same} == same
    assert same["entropy"] > 0
