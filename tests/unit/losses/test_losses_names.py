"""The loss, aggregation-mode and log-prob implementation names: one torch-free home that the
registry, the pipeline spec and the config checks all read; and the loss modules' imports."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import megatron_cegppo.losses as losses
from megatron_cegppo.config.validate import setting_problem
from megatron_cegppo.losses.names import LOGPROB_IMPLS, LOSS_AGG_MODES, LOSS_NAMES, check_choice
from megatron_cegppo.parallel.pipeline_loss import PolicyLossSpec

ROOT = Path(__file__).resolve().parents[3]
LOSSES_DIR = ROOT / "megatron_cegppo" / "losses"


def test_config_validation_and_the_names_import_no_torch():
    code = (
        "import json, sys\n"
        "import megatron_cegppo.config.validate, megatron_cegppo.losses.names\n"
        "print(json.dumps('torch' in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) is False


def test_the_registry_is_keyed_by_the_names():
    assert tuple(losses.POLICY_LOSSES) == LOSS_NAMES
    assert tuple(losses.LOSS_CONFIG_KEYS) == LOSS_NAMES


# config key -> (PolicyLossSpec field, the names both accept)
CHOICES = {
    "algorithm.loss": ("loss", LOSS_NAMES),
    "algorithm.loss_agg_mode": ("loss_agg_mode", LOSS_AGG_MODES),
    "model.logprob_impl": ("logprob_impl", LOGPROB_IMPLS),
}


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_config_and_spec_accept_exactly_the_names(key):
    field, names = CHOICES[key]
    for name in names:
        assert setting_problem(key, name) is None
        PolicyLossSpec(**{field: name})
    assert setting_problem(key, "other") is not None
    with pytest.raises(ValueError, match="'other'; choose one of"):
        PolicyLossSpec(**{field: "other"})


def test_check_choice_names_the_choices_in_order():
    check_choice("thing", "b", ("b", "a"))
    with pytest.raises(ValueError, match=r"^unknown thing 'c'; choose one of \['b', 'a'\]$"):
        check_choice("thing", "c", ("b", "a"))


def test_loss_kwargs_refuses_an_unknown_loss():
    with pytest.raises(ValueError, match=r"unknown policy loss 'reinforce'; choose one of \['cegppo', 'cispo'"):
        losses.loss_kwargs("reinforce", object())


def test_the_package_names_resolve_lazily():
    for name in losses.__all__:
        assert getattr(losses, name) is not None
    with pytest.raises(AttributeError):
        losses.no_such_name  # noqa: B018


def _local_imports(path: Path) -> set:
    """The sibling modules ``path`` imports anywhere, function bodies included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_cegppo.losses."):
            found.add(node.module.split(".")[2])
    return found


def test_the_loss_modules_import_no_cycle():
    graph = {p.stem: _local_imports(p) for p in LOSSES_DIR.glob("*.py") if p.stem != "__init__"}
    done, on_path = set(), []

    def visit(module):
        if module in on_path:
            raise AssertionError(f"import cycle: {' -> '.join(on_path[on_path.index(module):] + [module])}")
        if module in done or module not in graph:
            return
        on_path.append(module)
        for dep in graph[module]:
            visit(dep)
        on_path.pop()
        done.add(module)

    for module in graph:
        visit(module)
    assert graph["names"] == set()


def test_an_unknown_keyword_is_still_refused():
    import torch

    x = torch.zeros(1, 2)
    for fn in losses.POLICY_LOSSES.values():
        with pytest.raises(TypeError, match="loss_agg"):
            fn(x, x, x, x.bool(), loss_agg="token-mean")
