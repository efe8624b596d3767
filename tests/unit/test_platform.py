"""The platform module: device resolution and its errors, the layer implementation actually
importable, the p2p rule and the placement step."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_cegppo import platform as plat
from megatron_cegppo.platform import Platform, PlatformError


def test_cpu_setting_and_auto_without_gpus(monkeypatch):
    monkeypatch.setattr(plat, "nvidia_gpus_present", lambda: False)
    assert plat.resolve_device("cpu") == torch.device("cpu")
    assert plat.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        plat.resolve_device("gpu")


def test_cuda_setting_on_a_cpu_build_names_the_build():
    with pytest.raises(PlatformError, match="CPU-only build"):
        plat.resolve_device("cuda")


def test_auto_on_a_gpu_node_without_usable_cuda_is_an_error(monkeypatch):
    """A node with NVIDIA GPUs must not silently take the CPU path."""
    monkeypatch.setattr(plat, "nvidia_gpus_present", lambda: True)
    with pytest.raises(PlatformError, match="CUDA is not usable.*trainer.device=cpu"):
        plat.resolve_device("auto")


@pytest.mark.parametrize("driver,expected", [
    ("535.104.05", r"driver 535.104.05 is too old .* \(CUDA 13 needs driver 580.65 or newer\)"),
    (None, "no NVIDIA driver is loaded"),
    ("580.95.05", "reports no usable GPU although driver 580.95.05 is loaded"),
])
def test_driver_mismatch_messages(monkeypatch, driver, expected):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(plat, "nvidia_driver_version", lambda: driver)
    assert re.search(expected, plat.cuda_unusable_reason()), plat.cuda_unusable_reason()


def test_batched_p2p_only_off_gloo():
    cpu = Platform(torch.device("cpu"), "gloo", "local", "", False)
    gpu = dataclasses.replace(cpu, device=torch.device("cuda", 0), backend="nccl")
    assert not cpu.batch_p2p_comm and gpu.batch_p2p_comm


def test_transformer_config_takes_the_platform_p2p_rule():
    from types import SimpleNamespace

    from megatron_cegppo.models.hf_config import HFArchitecture, transformer_config_from_hf

    arch = HFArchitecture.of(SimpleNamespace(
        model_type="qwen2", vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64))
    assert transformer_config_from_hf(arch).batch_p2p_comm is plat.current_platform().batch_p2p_comm is False


def test_place_moves_every_tensor_of_nested_batches():
    @dataclasses.dataclass
    class Micro:
        ids: torch.Tensor
        n: int

    meta = Platform(torch.device("meta"), "gloo", "local", "", False)
    placed = meta.place({"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(3), 4)], "c": Micro(torch.ones(1), 5),
                         "d": "text"})
    assert placed["a"].is_meta and placed["b"][0].is_meta and placed["b"][1][0].is_meta and placed["b"][1][1] == 4
    assert placed["c"].ids.is_meta and placed["c"].n == 5 and placed["d"] == "text"
    assert meta.tensor(1.0).is_meta


def test_not_installed_transformer_engine_is_local(monkeypatch):
    monkeypatch.setattr(plat.importlib.util, "find_spec", lambda name: None)
    assert plat.importable_layer_implementation() == ("local", "transformer-engine is not installed")
    assert plat.layer_implementation(torch.device("cpu"))[0] == "local"


BROKEN_TE = '''
import sys
sys.path.insert(0, {path!r})
import importlib.util
print("FIND_SPEC_SAYS_TE", importlib.util.find_spec("transformer_engine") is not None)
if {workaround}:
    from megatron_cegppo import platform
    impl, reason = platform.layer_implementation(__import__("torch").device("cuda", 0))
    print("DECIDED", impl, "|", reason)
try:
    from megatron.core.models.gpt import gpt_layer_specs
    gpt_layer_specs.get_gpt_layer_local_spec()
    print("MEGATRON imports, HAVE_TE", gpt_layer_specs.HAVE_TE)
except ImportError as exc:
    print("MEGATRON ImportError", exc)
'''


def _run_with_broken_te(tmp_path, workaround: bool) -> str:
    te = tmp_path / "transformer_engine"
    (te / "pytorch").mkdir(parents=True, exist_ok=True)
    (te / "__init__.py").write_text("")
    (te / "pytorch" / "__init__.py").write_text(
        "raise ImportError('transformer_engine_torch.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n")
    code = textwrap.dedent(BROKEN_TE.format(path=str(tmp_path), workaround=workaround))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_installed_but_unimportable_transformer_engine_falls_back_to_local(tmp_path):
    """TE on the path whose torch extension does not load (an ABI mismatch): the platform
    picks megatron's local spec and megatron still imports."""
    out = _run_with_broken_te(tmp_path, workaround=True)
    assert "DECIDED local | transformer-engine is installed but does not import: ImportError" in out
    assert "FIND_SPEC_SAYS_TE True" in out  # what the old check looked at
    assert "MEGATRON imports, HAVE_TE False" in out


def test_without_the_workaround_megatron_does_not_import(tmp_path):
    """megatron.core.tensor_parallel.random catches ModuleNotFoundError only."""
    assert "MEGATRON ImportError transformer_engine_torch.so" in _run_with_broken_te(tmp_path, workaround=False)
