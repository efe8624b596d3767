"""RolloutEngine's sleep / wake / push sequencing, against a stand-in for ``vllm.LLM`` that
records the calls it receives (what vLLM does with them is checked on a GPU)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from megatron_cegppo.rollout import engine as engine_mod
from megatron_cegppo.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig


class RecordingLLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple] = []

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", None if tags is None else list(tags)))
        return True

    def collective_rpc(self, method, kwargs=None):
        weights = list(kwargs["weights_iterator"])
        self.calls.append((method, [name for name, _ in weights]))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append(("generate", len(requests)))
        outputs = []
        for request in requests:
            ids = request["prompt_token_ids"]
            out = types.SimpleNamespace(token_ids=[3], logprobs=[{3: types.SimpleNamespace(logprob=-0.5)}],
                                        text="", finish_reason="length")
            prompt_lps = [None] + [{t: types.SimpleNamespace(logprob=-float(t))} for t in ids[1:]]
            outputs.append(types.SimpleNamespace(outputs=[out], prompt_logprobs=prompt_lps))
        return outputs


@pytest.fixture
def make_engine(monkeypatch):
    """``make_engine(cuda, **config)``: a RolloutEngine on a RecordingLLM, as on a CUDA or a
    CPU machine."""
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.LLM = RecordingLLM
    fake_vllm.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.setattr(engine_mod, "share_run_id", lambda: "run")
    monkeypatch.setattr(engine_mod, "unique_cpu_shm_names", lambda: None)

    def make(cuda: bool, **config) -> RolloutEngine:
        monkeypatch.setattr(engine_mod, "current_platform", lambda: types.SimpleNamespace(is_cuda=cuda))
        return RolloutEngine("model", EngineConfig(**config))

    return make


WEIGHTS = [("model.embed_tokens.weight", torch.zeros(2)), ("lm_head.weight", torch.ones(2))]
SAMPLING = SamplingConfig(n=1, max_tokens=1)


def step(engine):
    """One RL step as the trainer runs it: generate, sleep, (train), push."""
    engine.generate([[1, 2]], SAMPLING, seeds=[0])
    engine.sleep()
    engine.push_weights(iter(WEIGHTS))


def test_level_2_wakes_weights_for_the_push_and_kv_cache_before_generating(make_engine):
    engine = make_engine(True)
    assert engine.llm.kwargs["enable_sleep_mode"] is True
    step(engine)
    engine.generate([[1, 2]], SAMPLING, seeds=[0])
    assert engine.llm.calls == [
        ("generate", 1),
        ("sleep", 2),
        ("wake_up", ["weights"]),
        ("reload_weights", [name for name, _ in WEIGHTS]),
        ("reset_prefix_cache",),
        ("wake_up", ["kv_cache"]),
        ("generate", 1),
    ]
    assert not engine.asleep


def test_level_2_keeps_the_kv_cache_asleep_until_the_next_generate(make_engine):
    engine = make_engine(True)
    step(engine)
    assert engine.asleep  # the KV cache still released after the push
    engine.llm.calls.clear()
    engine.prompt_logprobs([[1, 2, 3]])
    assert engine.llm.calls[0] == ("wake_up", ["kv_cache"])


def test_level_2_refuses_to_generate_from_discarded_weights(make_engine):
    engine = make_engine(True)
    engine.sleep()
    with pytest.raises(RuntimeError, match="push_weights"):
        engine.generate([[1, 2]], SAMPLING, seeds=[0])
    assert ("generate", 1) not in engine.llm.calls


def test_sleeping_twice_sleeps_once(make_engine):
    engine = make_engine(True)
    engine.sleep()
    engine.sleep()
    assert engine.llm.calls == [("sleep", 2)]


def test_level_1_wakes_everything_before_the_push(make_engine):
    engine = make_engine(True, sleep_level=1)
    step(engine)
    engine.generate([[1, 2]], SAMPLING, seeds=[0])
    assert engine.llm.calls == [
        ("generate", 1),
        ("sleep", 1),
        ("wake_up", None),
        ("reload_weights", [name for name, _ in WEIGHTS]),
        ("reset_prefix_cache",),
        ("generate", 1),
    ]


def test_level_1_generate_while_asleep_wakes_everything(make_engine):
    engine = make_engine(True, sleep_level=1)
    engine.sleep()
    engine.generate([[1, 2]], SAMPLING, seeds=[0])
    assert engine.llm.calls == [("sleep", 1), ("wake_up", None), ("generate", 1)]


def test_cpu_never_sleeps(make_engine):
    engine = make_engine(False)
    assert "enable_sleep_mode" not in engine.llm.kwargs
    step(engine)
    assert [c[0] for c in engine.llm.calls] == ["generate", "reload_weights", "reset_prefix_cache"]


def test_sleep_mode_off_on_cuda_never_sleeps(make_engine):
    engine = make_engine(True, enable_sleep_mode=False)
    step(engine)
    assert not any(c[0] in ("sleep", "wake_up") for c in engine.llm.calls)


def test_sleep_mode_on_the_cpu_is_refused(make_engine):
    with pytest.raises(ValueError, match="CUDA"):
        make_engine(False, enable_sleep_mode=True)


def test_sleep_level_is_checked():
    with pytest.raises(ValueError, match="sleep_level"):
        EngineConfig(sleep_level=3)


def test_prompt_logprobs_skip_the_first_token(make_engine):
    engine = make_engine(False)
    assert engine.prompt_logprobs([[4, 5, 6], [7]]) == [[-5.0, -6.0], []]
