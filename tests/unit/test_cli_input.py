"""Bad command lines and configs are refused before torch starts: one ``megatron-cegppo: ...``
message on stderr naming every problem, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cegppo.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
HEAVY = ("torch", "megatron", "vllm", "transformers")


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def refused(capsys, argv, *texts):
    """``main(argv)`` exits 2 with one message naming each of ``texts``; returns stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("megatron-cegppo: ") and err.count("megatron-cegppo: ") == 1, err
    assert "Traceback" not in err
    for text in texts:
        assert text in err, (text, err)
    return err


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    return path


# --- plan and submit: the cluster size ------------------------------------------------------

@pytest.mark.parametrize("nodes", ["0", "-1"])
def test_plan_nodes_below_one(capsys, nodes):
    """--nodes 0 was a ZeroDivisionError traceback."""
    refused(capsys, ["plan", "--config", "configs/qwen2p5_32b.yaml", "--nodes", nodes],
            f"--nodes must be >= 1, got {nodes}")


def submit_args(run_dir, *extra):
    return ["submit", "--config", TINY, "--nodes", "2", "--gpus-per-node", "0", "--dry-run", *extra,
            f"trainer.run_dir={run_dir}"]


@pytest.mark.parametrize("extra,text", [
    (["--nodes", "0"], "--nodes must be >= 1, got 0"),
    (["--gpus-per-node", "-1"], "--gpus-per-node must be >= 0, got -1"),
    (["--cpus-per-task", "0"], "--cpus-per-task must be >= 1, got 0"),
    (["--signal-seconds", "later"], "--signal-seconds must be 'auto' or a number of seconds, got 'later'"),
    (["--signal-seconds", "0"], "--signal-seconds must be positive, got 0"),
    (["--signal-seconds", "-30"], "--signal-seconds must be positive, got -30"),
    (["--time", "24h"], "--time must be a Slurm time limit"),
    (["--time", "1:2:3:4"], "got '1:2:3:4'"),
    (["--time", "1-"], "got '1-'"),
    (["--time", "-5"], "got '-5'"),
    (["--time", ""], "got ''"),
    (["--time", "1.5"], "got '1.5'"),
    (["--time", " 10"], "got ' 10'"),
])
def test_submit_refuses_bad_arguments_and_writes_nothing(capsys, tmp_path, extra, text):
    run_dir = tmp_path / "run"
    refused(capsys, submit_args(run_dir, *extra), text)
    assert not run_dir.exists()


@pytest.mark.parametrize("time", ["90", "30:00", "24:00:00", "2-12", "1-00:30", "1-00:00:00", "UNLIMITED",
                                  "infinite"])
def test_submit_accepts_slurm_time_formats(capsys, tmp_path, time):
    assert main(submit_args(tmp_path / "run", "--time", time)) == 0
    assert f"#SBATCH --time={time}\n" in capsys.readouterr().out


def test_submit_names_every_argument_problem_and_the_config_at_once(capsys, tmp_path):
    run_dir = tmp_path / "run"
    err = refused(capsys, submit_args(run_dir, "--nodes", "0", "--time", "soon", "--cpus-per-task", "0",
                                      "optim.lr=-1"),
                  "invalid arguments and config:", "--nodes", "--time", "--cpus-per-task", "optim.lr must be > 0")
    assert err.count("\n  - ") >= 4  # and the files tiny_cpu.yaml names, where they are missing
    assert not run_dir.exists()


def test_submit_refuses_missing_files_and_a_dry_run_warns(capsys, tmp_path):
    model = "model.path=" + str(tmp_path / "none")
    assert main(submit_args(tmp_path / "dry", model)) == 0  # the script may be prepared before its files
    err = capsys.readouterr().err
    assert "warning: submitting this script (without --dry-run) would be refused" in err and "model.path" in err
    args = [a for a in submit_args(tmp_path / "run", model) if a != "--dry-run"]
    refused(capsys, args, "model.path:", str(tmp_path / "none"))
    assert not (tmp_path / "run").exists()


# --- validate -------------------------------------------------------------------------------

def test_validate_rollout_tensor_parallel_zero(capsys):
    """Was a ZeroDivisionError traceback inside validate."""
    refused(capsys, ["validate", "--config", TINY, "--world-size", "2", "rollout.tensor_parallel=0"],
            "rollout.tensor_parallel must be >= 1, got 0")
    refused(capsys, ["validate", "--config", TINY, "rollout.tensor_parallel=0"], "rollout.tensor_parallel")


@pytest.mark.parametrize("world", ["0", "-4"])
def test_validate_world_size_below_one(capsys, world):
    refused(capsys, ["validate", "--config", TINY, "--world-size", world], f"--world-size must be >= 1, got {world}")


def test_validate_names_every_load_problem_at_once(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm:\n  beta1: high\n  beta1: 0.5\nrollout:\n  nn: 3\n")
    err = refused(capsys, ["validate", "--config", str(bad), "optim.lr=x", "trainer.stepz=3", "oops"],
                  "algorithm.beta1 is given twice (lines 2 and 3)", "unknown key rollout.nn",
                  "optim.lr: expected float, got 'x'", "unknown key trainer.stepz",
                  "override 'oops' must look like section.key=value")
    assert err.count("\n  - ") == 5


def test_validate_reports_config_and_file_problems_together(capsys, tmp_path):
    err = refused(capsys, ["validate", "--config", TINY, "optim.lr=-1", "optim.adam_eps=0",
                           f"model.path={tmp_path / 'no_model'}", f"data.train_path={tmp_path / 'no.jsonl'}"],
                  "invalid config:", "optim.lr must be > 0, got -1.0", "optim.adam_eps must be > 0, got 0.0",
                  f"model.path: {tmp_path / 'no_model'}", f"data.train_path: {tmp_path / 'no.jsonl'}")
    assert err.count("\n  - ") == 4


@pytest.mark.parametrize("what", ["missing", "folder", "not utf-8", "not yaml", "a list"])
def test_validate_a_bad_config_file(capsys, tmp_path, what):
    path = tmp_path / "c.yaml"
    if what == "folder":
        path.mkdir()
    elif what == "not utf-8":
        path.write_bytes(b"model:\n  path: \xff\n")
    elif what == "not yaml":
        path.write_text("model: {\n")
    elif what == "a list":
        path.write_text("- model\n")
    text = {"missing": "does not exist", "folder": "is a directory", "not utf-8": "is not UTF-8",
            "not yaml": "is not valid YAML", "a list": "top level must be a mapping"}[what]
    refused(capsys, ["validate", "--config", str(path)], text)


# --- train: every rank checks, one message per node --------------------------------------------

@pytest.mark.parametrize("local_rank,speaks", [(None, True), ("0", True), ("1", False), ("7", False)])
def test_train_refuses_on_every_rank_and_speaks_once_per_node(capsys, monkeypatch, local_rank, speaks):
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--config", TINY, "optim.lr=-1"]) == 2
    err = capsys.readouterr().err
    if speaks:
        assert err.startswith("megatron-cegppo: ") and "optim.lr must be > 0" in err and "Traceback" not in err
    else:
        assert err == ""


def test_train_checks_the_files(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused(capsys, ["train", "--config", TINY, f"model.path={tmp_path / 'm'}"], f"model.path: {tmp_path / 'm'}")


def test_train_world_size_not_a_number(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    refused(capsys, ["train", "--config", TINY], "WORLD_SIZE must be a positive integer, got 'two'")


# --- eval and export ----------------------------------------------------------------------------

def test_eval_data_must_exist(capsys, tmp_path):
    missing = tmp_path / "eval.jsonl"
    err = refused(capsys, ["eval", "--config", TINY, "--data", str(missing)], f"--data {missing} does not exist")
    assert err.count(str(missing)) == 1  # named once, not again as data.train_path
    refused(capsys, ["eval", "--config", TINY, "--data", str(tmp_path)], f"--data {tmp_path} is not a file")


@pytest.mark.parametrize("k", ["0", "-3"])
def test_eval_k_below_one(capsys, prompts, k):
    refused(capsys, ["eval", "--config", TINY, "--data", str(prompts), "--k", k], f"--k must be >= 1, got {k}")


def test_eval_checks_the_eval_file_not_the_training_file(capsys, tmp_path):
    """tiny_cpu.yaml's data.train_path is not what eval reads."""
    bad = tmp_path / "eval.jsonl"
    bad.write_text("not json\n")
    err = refused(capsys, ["eval", "--config", TINY, "--data", str(bad)], str(bad), "invalid JSON")
    assert "arithmetic_train.jsonl" not in err


def test_export_a_bad_shard_size_before_the_config(capsys, tmp_path):
    out = tmp_path / "out"
    refused(capsys, ["export", "--config", TINY, "--out", str(out), "--shard-size", "5XB", "parallel.tensor=1",
                     "algorithm.beta3=1"], "--shard-size '5XB'", "unknown key algorithm.beta3")
    assert not out.exists()


# --- no torch ------------------------------------------------------------------------------------

def _validate_in_a_fresh_python(*argv) -> dict:
    """``validate`` in a new interpreter: its exit status, stderr and the heavy modules it imported."""
    code = (
        "import json, sys\n"
        "from megatron_cegppo.cli import main\n"
        f"code = main({list(argv)!r})\n"
        f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "err": result.stderr}


def test_a_refused_config_imports_no_torch(tmp_path):
    result = _validate_in_a_fresh_python("validate", "--config", TINY, "optim.lr=-1", "rollout.tensor_parallel=0",
                                         f"model.path={tmp_path / 'm'}")
    assert result["code"] == 2 and "optim.lr" in result["err"]
    assert result["heavy"] == []


# a Qwen2 shape small enough to write as zeros
SHAPE = dict(model_type="qwen2", vocab_size=32, hidden_size=8, num_attention_heads=2, num_key_value_heads=2,
             head_dim=4, intermediate_size=16, num_hidden_layers=1, tie_word_embeddings=True, rms_norm_eps=1e-6,
             rope_theta=10000.0, max_position_embeddings=64)


@pytest.fixture
def task_model(tmp_path):
    """An HF folder the preflight accepts: config.json, safetensors weights, tokenizer.json."""
    import numpy as np
    from safetensors.numpy import save_file

    c, folder = SHAPE, tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(c))
    vocab = {f"t{i}": i for i in range(c["vocab_size"])}
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab}}))
    h, q, kv, ffn = c["hidden_size"], 8, 8, c["intermediate_size"]
    layer = "model.layers.0."
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
              layer + "input_layernorm.weight": (h,), layer + "post_attention_layernorm.weight": (h,),
              layer + "self_attn.q_proj.weight": (q, h), layer + "self_attn.q_proj.bias": (q,),
              layer + "self_attn.k_proj.weight": (kv, h), layer + "self_attn.k_proj.bias": (kv,),
              layer + "self_attn.v_proj.weight": (kv, h), layer + "self_attn.v_proj.bias": (kv,),
              layer + "self_attn.o_proj.weight": (h, q), layer + "mlp.gate_proj.weight": (ffn, h),
              layer + "mlp.up_proj.weight": (ffn, h), layer + "mlp.down_proj.weight": (h, ffn)}
    save_file({n: np.zeros(s, np.float32) for n, s in shapes.items()}, str(folder / "model.safetensors"))
    return folder


def test_the_model_folder_is_good(task_model):
    from megatron_cegppo.preflight import model_folder_problems

    assert model_folder_problems(str(task_model)) == []


def test_validating_a_good_config_imports_no_torch(task_model, prompts, tmp_path):
    result = _validate_in_a_fresh_python("validate", "--config", TINY, f"model.path={task_model}",
                                         f"data.train_path={prompts}", f"trainer.run_dir={tmp_path / 'run'}")
    assert result["code"] == 0, result["err"]
    assert result["heavy"] == []
