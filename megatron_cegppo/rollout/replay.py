"""A rollout engine that replays recorded completions: a test double for vLLM.

It stands in for :class:`~megatron_cegppo.rollout.engine.RolloutEngine` where vLLM cannot be
installed (a GPU machine without network, a quick check of the actor alone): ``generate``
returns the token ids, log-probs and texts that a real engine produced for the same prompts
(recorded with :func:`record`), and ``push_weights`` consumes the weight stream exactly as the
real engine does (every rank of the TP/PP groups must, since the stream gathers across them)
and counts what it received. What it does not do: sample, or use the pushed weights. Its
log-probs are the recording model's, so the train/rollout mismatch is meaningful while the
trained weights still equal the recorded ones (the first step) and grows after that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from megatron_cegppo.rollout.engine import Completion, SamplingConfig

FORMAT = "megatron-cegppo-replay/1"


class ReplayError(ValueError):
    """The recording cannot serve a request (unknown prompt, too few completions, bad file)."""


class ReplayEngine:
    def __init__(self, recording: str | os.PathLike):
        path = Path(recording)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ReplayError(f"{path}: not a readable replay recording ({exc})") from None
        if data.get("format") != FORMAT:
            raise ReplayError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        self.path = path
        self.sampling = data.get("sampling", {})
        self._by_prompt: dict[tuple[int, ...], list[dict]] = {}
        for entry in data["entries"]:
            self._by_prompt.setdefault(tuple(entry["prompt_ids"]), []).append(entry)
        self._served: dict[tuple[int, ...], int] = {}
        self.pushes = 0
        self.pushed_tensors = 0
        self.pushed_bytes = 0
        self.asleep = False

    @property
    def prompts(self) -> list[list[int]]:
        return [list(p) for p in self._by_prompt]

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, seeds: Sequence[int]) -> list[Completion]:
        """The recorded completions of each prompt: the i-th request for a prompt gets its i-th
        recording (cycling), so dynamic sampling's later rounds see other samples."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        self.wake_up()
        out = []
        for index, prompt in enumerate(prompts):
            key = tuple(int(t) for t in prompt)
            entries = self._by_prompt.get(key)
            if not entries:
                raise ReplayError(f"{self.path}: no recording for prompt {list(key)[:16]}...")
            served = self._served.get(key, 0)
            self._served[key] = served + 1
            entry = entries[served % len(entries)]
            recorded = entry["completions"]
            if len(recorded) < sampling.n:
                raise ReplayError(f"{self.path}: {len(recorded)} completions recorded for a prompt, {sampling.n} asked")
            for c in recorded[:sampling.n]:
                ids = [int(t) for t in c["token_ids"]][:sampling.max_tokens]
                lps = [float(x) for x in c["logprobs"]][:len(ids)]
                out.append(Completion(index, ids, lps, c.get("text", ""), c.get("finish_reason")))
        return out

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Consumes the stream (its collectives must run on every rank) and counts it."""
        self.wake_up()
        for _, tensor in named_tensors:
            self.pushed_tensors += 1
            self.pushed_bytes += tensor.numel() * tensor.element_size()
        self.pushes += 1

    def sleep(self) -> None:
        self.asleep = True

    def wake_up(self) -> None:
        self.asleep = False


def record(engine, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, seeds: Sequence[int],
           out: str | os.PathLike, *, rounds: int = 1, note: str = "") -> Path:
    """Runs ``engine.generate`` ``rounds`` times (seeds shifted each round) and writes what it
    returned as a recording :class:`ReplayEngine` can serve."""
    entries = []
    for round_ in range(rounds):
        completions = engine.generate(prompts, sampling, [s + round_ for s in seeds])
        grouped: dict[int, list[dict]] = {}
        for c in completions:
            grouped.setdefault(c.prompt_index, []).append(
                {"token_ids": list(c.token_ids), "logprobs": list(c.logprobs), "text": c.text,
                 "finish_reason": c.finish_reason})
        entries.extend({"prompt_ids": list(prompts[i]), "completions": grouped.get(i, [])} for i in range(len(prompts)))
    data = {"format": FORMAT, "note": note,
            "sampling": {"n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p,
                         "max_tokens": sampling.max_tokens},
            "entries": entries}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    os.replace(tmp, out)
    return out
