"""Supervised warm-up of a tiny Qwen2 policy on addition: the RL demo's starting checkpoint
(2-digit, answer only) and the entropy study's (3-digit, the column working written out before
the answer: a longer response with more tokens to sample).

RL can only improve a policy that sometimes earns a reward and sometimes does not, so the
warm-up stops as soon as the *sampled* accuracy (temperature 1, the way rollouts sample)
enters ``[target - band, target + band]``.  Accuracy climbs from ~0.1 to ~0.9 within a
couple of hundred steps, so the stop is driven by measurement, checked often, never by a
fixed step count.

    python -m megatron_cegppo.demo.warmup --out checkpoints/tiny_qwen2_warmup --seed 0 \\
        --target-accuracy 0.35
    python -m megatron_cegppo.demo.warmup --out checkpoints/tiny_qwen2_written3 --digits 3 \\
        --written-steps
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from typing import Optional, Sequence

import torch

from megatron_cegppo.rewards.synthetic import arithmetic_problem, arithmetic_reward, written_addition

from .tokenizer import BOXED, load_task_tokenizer, train_task_tokenizer

__all__ = ["tiny_qwen2_config", "sampled_accuracy", "warmup", "main"]


# ---------------------------------------------------------------------------------------
# Task: the RL demo's (rewards.synthetic), so the warm-up measures the reward RL optimises
# ---------------------------------------------------------------------------------------
def _all_pairs(digits: int) -> list[tuple[int, int]]:
    """Every pair of ``digits``-digit operands: the held-out split is drawn from all of them."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    return [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]


# Enough problems for any warm-up (a few hundred steps of 128); 3-digit operands have 810k
# pairs, whose tokenization alone would take minutes. 2-digit ones (8k) are all kept.
MAX_TRAIN_PROBLEMS = 100_000


def _response_text(example: dict, written_steps: bool) -> str:
    """The supervised response: the answer boxed, after the column working when asked."""
    a, b = example["prompt"].rstrip("=").split("+")
    working = written_addition(int(a), int(b)) if written_steps else ""
    return f"{working}{BOXED}{example['answer']}}}"


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------
def tiny_qwen2_config(tokenizer):
    """~0.5M parameters; head_dim 32 is the smallest vLLM's CPU attention accepts."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),  # exact: vLLM and the RL trainer index logits by token id
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=2,
        intermediate_size=512,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
def _encode_examples(tokenizer, examples: list[dict], written_steps: bool = False):
    """Token ids of ``prompt [working] \\boxed{answer} </s>`` and the prompt lengths."""
    seqs, prompt_lens = [], []
    for ex in examples:
        p = tokenizer(ex["prompt"]).input_ids  # as vLLM encodes a prompt
        r = tokenizer(_response_text(ex, written_steps), add_special_tokens=False).input_ids
        seqs.append(p + r + [tokenizer.eos_token_id])
        prompt_lens.append(len(p))
    return seqs, prompt_lens


def _batch(seqs, prompt_lens, idx, pad_id):
    """Right-padded batch; labels are -100 outside the response so only it is learned."""
    rows = [seqs[i] for i in idx]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for j, (i, row) in enumerate(zip(idx, rows)):
        ids[j, : len(row)] = torch.tensor(row)
        labels[j, prompt_lens[i] : len(row)] = ids[j, prompt_lens[i] : len(row)]
        mask[j, : len(row)] = 1
    return ids, mask, labels


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 8,
                     temperature: float = 1.0, seed: int = 0) -> list[str]:
    """Plain ancestral sampling from the full softmax (no top-k/top-p), as the rollouts do.

    Prompts must tokenize to the same length (true for fixed-width operands), which keeps
    the loop free of left-padding.
    """
    enc = [tokenizer(p).input_ids for p in prompts]
    if len({len(e) for e in enc}) != 1:
        raise ValueError("sample_responses needs prompts of equal token length")
    ids = torch.tensor(enc)
    gen = torch.Generator().manual_seed(seed)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    out = []
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[:, -1, :].float()
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_token_id), nxt)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == tokenizer.eos_token_id
        if bool(done.all()):
            break
    model.train(was_training)
    gen_ids = torch.stack(out, dim=1).tolist()
    texts = []
    for row in gen_ids:
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def sampled_accuracy(model, tokenizer, examples: list[dict], *, seed: int = 0,
                     temperature: float = 1.0, max_new_tokens: int = 8) -> float:
    responses = sample_responses(model, tokenizer, [e["prompt"] for e in examples],
                                 temperature=temperature, seed=seed, max_new_tokens=max_new_tokens)
    return sum(arithmetic_reward(r, e["answer"]) for r, e in zip(responses, examples)) / len(examples)


# ---------------------------------------------------------------------------------------
# Warm-up
# ---------------------------------------------------------------------------------------
def warmup(out: str, *, seed: int = 0, target_accuracy: float = 0.35, band: float = 0.1,
           max_steps: int = 3000, lr: float = 2e-3, batch_size: int = 128,
           lr_warmup_steps: int = 10, eval_size: int = 256, eval_every: int = 25,
           fine_eval_every: int = 5, fine_eval_from: float = 0.05, digits: int = 2,
           written_steps: bool = False, log=print) -> dict:
    """Train until the sampled accuracy is within ``band`` of ``target_accuracy`` (or
    ``max_steps``), save the HF folder to ``out`` and return the ``warmup.json`` record."""
    from transformers import Qwen2ForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)

    # Tokenizer files are written straight into the checkpoint folder (deterministic).
    # the working's separator is the one character the answer-only task never writes
    train_task_tokenizer(out, texts=[","] if written_steps else None)
    tok = load_task_tokenizer(out)

    # Held-out prompts are never trained on; the eval sampling seed is fixed so two
    # evaluations differ only through the weights.
    pairs = _all_pairs(digits)
    rng.shuffle(pairs)
    eval_set = [arithmetic_problem(a, b) for a, b in pairs[:eval_size]]
    train_set = [arithmetic_problem(a, b) for a, b in pairs[eval_size:eval_size + MAX_TRAIN_PROBLEMS]]
    seqs, prompt_lens = _encode_examples(tok, train_set, written_steps)
    eval_seed = seed + 1
    # room for the longest response (all problems of a width have the same prompt length)
    max_new = max(len(q) - n for q, n in zip(seqs, prompt_lens)) + 2
    measure = lambda m, t, examples, seed: sampled_accuracy(  # noqa: E731
        m, t, examples, seed=seed, max_new_tokens=max_new)

    model = Qwen2ForCausalLM(tiny_qwen2_config(tok))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, lr_warmup_steps)))
    data_gen = torch.Generator().manual_seed(seed)

    lo, hi = target_accuracy - band, target_accuracy + band
    acc = measure(model, tok, eval_set, eval_seed)
    history = [(0, acc)]
    log(f"step {0:5d}  acc {acc:.3f}  ({time.perf_counter() - t0:.1f}s)")
    best = (abs(acc - target_accuracy), 0, acc, copy.deepcopy(model.state_dict()))
    step, loss_val = 0, float("nan")
    while not (lo <= acc <= hi) and step < max_steps:
        idx = torch.randint(len(seqs), (batch_size,), generator=data_gen).tolist()
        ids, mask, labels = _batch(seqs, prompt_lens, idx, tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        loss_val = loss.item()
        every = fine_eval_every if acc >= fine_eval_from else eval_every
        if step % every == 0 or step == max_steps:
            acc = measure(model, tok, eval_set, eval_seed)
            history.append((step, acc))
            log(f"step {step:5d}  loss {loss_val:.4f}  acc {acc:.3f}  "
                f"({time.perf_counter() - t0:.1f}s)")
            if abs(acc - target_accuracy) < best[0]:
                best = (abs(acc - target_accuracy), step, acc, copy.deepcopy(model.state_dict()))

    # Keep the evaluated weights closest to the target: if one training interval jumped
    # over the band, the earlier snapshot is the better starting point.
    _, best_step, best_acc, state = best
    model.load_state_dict(state)
    reached = lo <= best_acc <= hi
    if not reached:
        log(f"warning: accuracy {best_acc:.3f} (step {best_step}) is outside "
            f"[{lo:.2f}, {hi:.2f}] after {step} steps")

    model.save_pretrained(out, safe_serialization=True)
    # Measure again through the saved files, the way consumers load them (with config.json
    # present AutoTokenizer may pick a different tokenizer class than during training).
    reloaded = Qwen2ForCausalLM.from_pretrained(out)
    reloaded_tok = load_task_tokenizer(out)
    reload_acc = measure(reloaded, reloaded_tok, eval_set, eval_seed)
    if abs(reload_acc - best_acc) > 0.02:
        raise RuntimeError(f"the checkpoint saved to {out} measures {reload_acc:.3f}, "
                           f"the trained model {best_acc:.3f}")
    # The stop decision was taken on a noisy measurement; a fresh one (4 samples per
    # prompt, other seed) is the unbiased estimate of the starting accuracy.
    recheck_acc = measure(reloaded, reloaded_tok, eval_set * 4, eval_seed + 1)
    record = {
        "sampled_accuracy": best_acc,
        "sampled_accuracy_recheck": recheck_acc,
        "recheck_samples": 4 * len(eval_set),
        "temperature": 1.0,
        "eval_prompts": len(eval_set),
        "eval_sampling_seed": eval_seed,
        "step": best_step,
        "steps_trained": step,
        "reached_target": reached,
        "target_accuracy": target_accuracy,
        "band": band,
        "seed": seed,
        "lr": lr,
        "batch_size": batch_size,
        "digits": digits,
        "written_steps": written_steps,
        "final_loss": loss_val,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
        "history": history,
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }
    with open(os.path.join(out, "warmup.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    log(f"saved {out}: accuracy {best_acc:.3f} at step {best_step} "
        f"(recheck {recheck_acc:.3f}), {record['wall_time_s']:.1f}s")
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="HF checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-accuracy", type=float, default=0.35)
    p.add_argument("--band", type=float, default=0.1, help="stop within target +- band")
    p.add_argument("--digits", type=int, default=2, help="operand width")
    p.add_argument("--written-steps", action="store_true",
                   help="train the column working before the boxed answer (a longer response)")
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr-warmup-steps", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--fine-eval-every", type=int, default=5,
                   help="eval interval once accuracy passes --fine-eval-from")
    p.add_argument("--fine-eval-from", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; 1 is as fast for this model and does not "
                        "stall when other jobs share the cores")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    warmup(a.out, seed=a.seed, target_accuracy=a.target_accuracy, band=a.band,
           max_steps=a.max_steps, lr=a.lr, batch_size=a.batch_size,
           lr_warmup_steps=a.lr_warmup_steps, eval_size=a.eval_size,
           eval_every=a.eval_every, fine_eval_every=a.fine_eval_every,
           fine_eval_from=a.fine_eval_from, digits=a.digits, written_steps=a.written_steps,
           log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
