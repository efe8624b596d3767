"""The typed configuration of a training run. Every default lives here, once.

Imports nothing heavy: a config is loaded and validated before torch/megatron/vLLM start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

RECOMPUTE_MODES = ("none", "selective", "full")
DEVICE_SETTINGS = ("auto", "cuda", "cpu")
TRUNCATION_MODES = ("error", "left", "right")
SHORT_BATCH_MODES = ("fill", "shrink")
WANDB_MODES = ("online", "offline")


@dataclass
class ModelConfig:
    path: str = ""  # HF folder: config.json, safetensors weights, tokenizer
    dtype: str = "float32"  # float32 (CPU) | bfloat16 (GPU, fp32 master weights)
    logprob_impl: str = "fused"  # fused | logits (see parallel.vocab_parallel)
    # an HF config.json giving the model's shape, for `plan` before the weights are at hand;
    # default: <path>/config.json
    architecture: str = ""
    # start from a Megatron-LM torch_dist checkpoint (a save folder with
    # latest_checkpointed_iteration.txt, or one iter_NNNNNNN folder), saved at any TP/PP: its
    # model tensors instead of path's weights (path still gives the architecture and the
    # tokenizer). A resume reads the run's own checkpoints.
    megatron_checkpoint: str = ""


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    sequence_parallel: bool = False
    # activation recomputation: none | selective (core attention) | full (each layer's input
    # kept, the whole layer recomputed in backward)
    recompute: str = "none"
    # data parallel = world size / (tensor * pipeline)


@dataclass
class RolloutConfig:
    tensor_parallel: int = 1  # vLLM's TP, independent of training TP
    n: int = 8  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list = field(default_factory=list)
    max_model_len: int = 1024
    kv_cache_bytes: int = 256 << 20  # CPU engines
    gpu_memory_utilization: float = 0.5  # GPU engines
    weight_bucket_bytes: int = 256 << 20


@dataclass
class DataConfig:
    train_path: str = ""  # .jsonl, .json (JSON lines or one array) or .parquet
    # a dotted key reaches a nested field (verl's layout: answer_key=reward_model.ground_truth);
    # a prompt is a string, or a list of {role, content} messages rendered by the chat template
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    use_chat_template: Optional[bool] = None  # None: when the tokenizer has one
    shuffle: bool = True
    # the longest prompt, in tokens after the chat template; default (None): what the model
    # leaves beside a full response, rollout.max_model_len - rollout.max_tokens
    max_prompt_tokens: Optional[int] = None
    # a prompt over max_prompt_tokens: error (refused at load, with the count and the longest)
    # | left (its first tokens dropped) | right (its last tokens dropped)
    truncation: str = "error"


@dataclass
class RewardConfig:
    # a registered reward: math (1 / 0 on the last \boxed{} answer) | math_signed (+1 / -1,
    # math-verify on the whole response: the authors') | arithmetic | your own
    name: str = "math"


@dataclass
class EntropyControlConfig:
    """beta1 and beta2 moved between steps so that token entropy settles in a band around a
    target (loss cegppo; see megatron_cegppo.algorithms.entropy_control)."""

    enabled: bool = False
    target: float = 0.0  # absolute token entropy (nats); 0: target_fraction x the starting entropy
    target_fraction: float = 0.8  # of the mean entropy of the warm-up steps
    band: float = 0.1  # entropy within target x (1 +- band) is on target
    warmup_steps: int = 5  # steps that only measure (the starting entropy)
    kp: float = 1.0  # proportional gain, on the relative error
    ki: float = 0.05  # integral gain
    # the error is on a moving average of the entropy: m <- smoothing x m + (1 - smoothing) x
    # entropy, from the warm-up's mean (a step's entropy is noisy); 0: the raw entropy
    smoothing: float = 0.8
    # hold the configured betas after the warm-up until the smoothed entropy first comes down
    # to the band's top: learning lowers it by itself, and lowering it further before then
    # drove beta1 to its bound. False: act right after the warm-up
    wait_for_band: bool = True
    beta1_min: float = 0.25  # the betas' bounds (beta1 = 2 was measured to collapse the reward)
    beta1_max: float = 1.0
    beta2_min: float = 0.5
    beta2_max: float = 2.0


@dataclass
class AlgorithmConfig:
    loss: str = "cegppo"  # cegppo | ppo | cispo | gspo
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta1: float = 0.5
    beta2: float = 1.0
    clip_ratio_c: float = 10.0
    loss_agg_mode: str = "token-mean"
    normalize_advantage_std: bool = True  # GRPO; False: Dr. GRPO
    dynamic_sampling: bool = True  # DAPO: drop groups whose rewards are all equal
    max_sampling_rounds: int = 3
    prompts_per_step: int = 32  # groups trained per step (at most, with short_batch=shrink)
    # prompts generated per sampling round (dynamic sampling); default: prompts_per_step. The
    # authors generate 256 to train 128 (gen_batch_size)
    prompts_per_round: Optional[int] = None
    # fewer groups kept than prompts_per_step after max_sampling_rounds: fill (the batch is
    # topped up with dropped, zero-advantage groups) | shrink (the authors': train on the kept
    # groups, cut to whole mini-batches of prompts_per_step / minibatches groups, so the step
    # takes fewer optimizer steps; below one mini-batch, one is filled)
    short_batch: str = "fill"
    minibatches: int = 2  # optimizer steps per training step (per epoch), of a full batch
    epochs: int = 1
    micro_batch_size: int = 8  # sequences per micro-batch per data-parallel rank (unpacked)
    # set: sequences packed into micro-batches of this many tokens (no sequence split, none
    # attending to another), balanced over data-parallel ranks; micro_batch_size is then unused.
    # At least rollout.max_model_len - 1 (the longest prompt + response).
    max_tokens_per_microbatch: Optional[int] = None
    entropy_coeff: float = 0.0
    kl_coeff: float = 0.0  # reference-model KL (off in the paper)
    # > 0 adds this x the negative log-likelihood of the tokens of correct responses (reward
    # equal to the reward's correct score), aggregated in loss_agg_mode over those responses
    # of the mini-batch; the authors' scripts use 0.1 (positive_loss_coeff)
    positive_loss_coeff: float = 0.0
    tis_cap: Optional[float] = None  # truncated importance sampling vs the rollout engine
    entropy_control: EntropyControlConfig = field(default_factory=EntropyControlConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    schedule: str = "constant"  # constant | cosine (after warm-up)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainerConfig:
    steps: int = 100
    seed: int = 0
    run_dir: str = "runs/default"
    log_every: int = 1
    save_every: int = 0  # 0: only at the end and on a stop signal
    keep_checkpoints: int = 2
    resume_from: Optional[str] = None  # a step_* folder; default: the run directory's latest
    # auto: CUDA where torch can use it, the CPU where the node has no NVIDIA GPU (a GPU node
    # whose driver does not match the torch build is an error); cuda: a GPU or an error; cpu
    device: str = "auto"
    # a mini-batch whose gradients are not finite is skipped (the weights stay as they were)
    # and counted; this many in a row stop the run with a message
    max_consecutive_nonfinite: int = 3
    # resuming in a run directory whose config differs in a setting that alters results (the
    # model, loss and algorithm, batch sizes, optimizer, data, reward, seed) is refused unless
    # this is set; the old config is kept beside the new one either way
    allow_config_change: bool = False
    # a run directory whose checkpoints all fail verification is refused (naming each and why)
    # unless this is set: then the run starts again from model.path
    start_over: bool = False
    # every this many steps (0: never) the first rollout_dump_groups groups of the step go to
    # <run_dir>/rollouts/step_N.jsonl (prompt, response, reward, advantage, length, mismatch),
    # at most rollout_dump_max_bytes per file
    rollout_dump_every: int = 0
    rollout_dump_groups: int = 4
    rollout_dump_max_bytes: int = 4 << 20


def prompt_token_limit(cfg: "Config") -> int:
    """The most tokens a prompt may have: ``data.max_prompt_tokens``, else what the model leaves
    beside a full response, ``rollout.max_model_len - rollout.max_tokens``."""
    if cfg.data.max_prompt_tokens is not None:
        return cfg.data.max_prompt_tokens
    return cfg.rollout.max_model_len - cfg.rollout.max_tokens


def training_positions(cfg: "Config") -> int:
    """The most model positions a training sequence takes (prompt + response - 1,
    label-aligned): :func:`prompt_token_limit` plus ``rollout.max_tokens``, within
    ``rollout.max_model_len`` (which may be longer, for validation's longer responses)."""
    r = cfg.rollout
    return min(prompt_token_limit(cfg) + r.max_tokens, r.max_model_len) - 1


@dataclass
class ValidationConfig:
    """Held-out accuracy inside the run, through the same vLLM engines after the weight push."""

    # prompt files, each scored on its own (the training file's layout and keys); a problem
    # repeated in a file (the authors' AIME files hold each 32 times) is one problem sampled more
    datasets: list = field(default_factory=list)
    every: int = 0  # steps between validations; 0: only before training (if before_training)
    before_training: bool = True
    k: int = 1  # samples per row
    temperature: float = 0.6
    top_p: float = 0.95
    # the longest validation response; default rollout.max_tokens. Prompts get what
    # rollout.max_model_len leaves beside it
    max_tokens: Optional[int] = None


@dataclass
class WandbConfig:
    """Weights & Biases beside metrics.jsonl and TensorBoard (off by default; pip install
    megatron-cegppo[wandb]). A resumed run continues the same W&B run."""

    enabled: bool = False
    project: str = "megatron-cegppo"
    name: Optional[str] = None  # default: the run directory's name
    tags: list = field(default_factory=list)
    mode: str = "online"  # online | offline (written under <run_dir>/wandb, `wandb sync` later)


@dataclass
class ClusterConfig:
    """Where the run is meant to go: the planner's and `submit`'s defaults."""

    nodes: int = 1
    gpus_per_node: int = 8
    # per GPU, as CUDA reports its total (an H100 80GB SXM: about 79.1 GiB)
    gpu_memory_gib: float = 79.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
