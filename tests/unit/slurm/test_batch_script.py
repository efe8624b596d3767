"""The rendered batch script run by bash with stand-ins for srun, scontrol and squeue (and
for the trainer's python): what reaches the launcher, what is exported, when it requeues.
The same script on a real Slurm cluster: tests/slurm/test_slurm_requeue.py."""

from __future__ import annotations

import calendar
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_cegppo import slurm
from megatron_cegppo.cli import main
from megatron_cegppo.slurm import render_sbatch, resolve_signal_seconds
from megatron_cegppo.trainer.stopping import StopClock, save_timing

ODD = """rollout.stop=["it's a <stop> \\"$HOME\\" `id` ;&|*"]"""

FAKE_SRUN = """#!/usr/bin/env bash
# drops srun's own options, runs the task as node 0 of 1
while [ "$#" -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
export SLURM_NODEID=0 SLURM_NNODES=1
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) printf 'node1\nnode2\n' ;;
  requeue) echo "$2" >> "$FAKE_LOG/requeued" ;;
esac
"""
FAKE_SQUEUE = """#!/usr/bin/env bash
echo "$FAKE_END"
"""
# the trainer's stand-in: records its arguments and environment, may write the STOPPED marker
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
run_dir = os.environ["FAKE_RUN_DIR"]
json.dump({{"argv": sys.argv[1:], "env": dict(os.environ),
           "stale": [n for n in ("STOP", "STOPPED") if os.path.exists(os.path.join(run_dir, n))]}},
          open(os.path.join(os.environ["FAKE_LOG"], "call.json"), "w"))
if os.environ.get("FAKE_WAIT_FOR_STOP") == "1":  # a trainer that runs until asked to stop
    import time
    open(os.path.join(os.environ["FAKE_LOG"], "started"), "w").close()
    stop = os.path.join(run_dir, "STOP")
    for _ in range(200):
        if os.path.exists(stop) and open(stop).read():
            break
        time.sleep(0.05)
    open(os.path.join(os.environ["FAKE_LOG"], "stop_text"), "w").write(open(stop).read())
if os.environ.get("FAKE_WRITE_STOP") == "1":  # an operator's STOP file during the run
    open(os.path.join(run_dir, "STOP"), "w").close()
if os.environ.get("FAKE_STOPPED") == "1":
    open(os.path.join(run_dir, "STOPPED"), "w").write('{{"step": 3, "reason": "requested"}}\\n')
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def _tools(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("squeue", FAKE_SQUEUE),
                       ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run(tmp_path: Path, *, exit_code=0, stopped=False, end="2026-12-01T12:00:00", overrides=(ODD,), **env):
    bin_dir = tmp_path / "bin" if (tmp_path / "bin").exists() else _tools(tmp_path)
    run_dir = tmp_path / "run dir"  # a space in the path too
    log = tmp_path / "log"
    log.mkdir(exist_ok=True)
    (log / "requeued").unlink(missing_ok=True)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(config="configs/tiny_cpu.yaml", overrides=list(overrides), run_dir=str(run_dir),
                                    nodes=2, gpus_per_node=0, time="10:00", signal_seconds=120,
                                    python=str(bin_dir / "python"), procs_per_node=1))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MASTER_", "GLOO_", "CEGPPO_"))}
    full_env = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "12345",
                "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_CPUS_PER_TASK": "4", "TZ": "UTC",
                "FAKE_LOG": str(log), "FAKE_RUN_DIR": str(run_dir), "FAKE_EXIT": str(exit_code),
                "FAKE_STOPPED": "1" if stopped else "0", "FAKE_END": end, **env}
    run_dir.mkdir(exist_ok=True)
    (run_dir / "STOP").write_text("")  # stale, from an earlier start
    (run_dir / "STOPPED").write_text("{}\n")
    done = subprocess.run(["bash", str(script)], env=full_env, capture_output=True, text=True, timeout=60)
    call = json.loads((log / "call.json").read_text())
    requeued = (log / "requeued").read_text().split() if (log / "requeued").exists() else []
    return done, call, requeued, run_dir


def test_overrides_reach_the_launcher_verbatim_and_the_environment_is_set(tmp_path):
    done, call, requeued, run_dir = _run(tmp_path)
    assert done.returncode == 0 and requeued == [], done.stderr
    config = str(Path("configs/tiny_cpu.yaml").resolve())
    assert call["argv"] == ["-m", "megatron_cegppo.slurm", "node", "--nproc-per-node=1", "--",
                            "--config", config, f"trainer.run_dir={run_dir}", ODD]
    assert call["stale"] == []  # STOP and STOPPED of the previous start cleared before srun
    env = call["env"]
    assert env["SRUN_CPUS_PER_TASK"] == "4"
    assert env["MASTER_ADDR"] == "node1" and env["MASTER_PORT"] == str(10000 + 12345 % 20000)
    assert env["CEGPPO_PEER_ADDR"] == "node2"
    assert env["CEGPPO_JOB_END_TIME"] == str(calendar.timegm((2026, 12, 1, 12, 0, 0)))
    assert env["CEGPPO_STOP_LEAD_SECONDS"] == "120"
    assert "GLOO_SOCKET_IFNAME" not in env  # chosen per node by the launcher


def test_explicit_port_and_interface_win_and_an_unknown_end_time_is_left_unset(tmp_path):
    for end in ("NONE", "Unknown", "N/A", ""):
        done, call, _, _ = _run(tmp_path, end=end, MASTER_PORT="23456", GLOO_SOCKET_IFNAME="ib0",
                                CEGPPO_JOB_END_TIME="1")  # a stale value from the submitting shell
        assert done.returncode == 0, done.stderr
        env = call["env"]
        assert env["MASTER_PORT"] == "23456" and env["GLOO_SOCKET_IFNAME"] == "ib0"
        assert "CEGPPO_JOB_END_TIME" not in env, end


def test_the_stopped_marker_requeues_whatever_exit_code_torchrun_reports(tmp_path):
    # torchrun reports the trainer's 3 as 1: the marker decides
    done, _, requeued, _ = _run(tmp_path, exit_code=1, stopped=True)
    assert done.returncode == 3 and requeued == ["12345"], done.stdout + done.stderr
    assert "saved; requeueing job 12345" in done.stdout and '"reason": "requested"' in done.stdout
    # a failure without the marker is a failure, not requeued
    done, _, requeued, _ = _run(tmp_path, exit_code=1)
    assert done.returncode == 1 and requeued == []
    # ... unless a stop was asked for: the ranks may have been ended before the marker was written
    done, _, requeued, _ = _run(tmp_path, exit_code=1, FAKE_WRITE_STOP="1")
    assert done.returncode == 3 and requeued == ["12345"] and "stopped while saving" in done.stdout
    # a run that finished is not requeued, whatever files are left
    done, _, requeued, _ = _run(tmp_path, exit_code=0, FAKE_WRITE_STOP="1")
    assert done.returncode == 0 and requeued == []


def test_node_launcher_passes_arguments_through_and_picks_the_gloo_interface(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    for key in ("GLOO_SOCKET_IFNAME",):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "22345")
    slurm._node_main(["--nproc-per-node=8", "--", "--config", "c.yaml", ODD, "--"])
    path, argv, env = calls[-1]
    assert path == sys.executable
    assert argv[1:] == ["-m", "torch.distributed.run", "--nnodes=2", "--node-rank=1", "--nproc-per-node=8",
                        "--master-addr=127.0.0.1", "--master-port=22345", "-m", "megatron_cegppo.cli", "train",
                        "--config", "c.yaml", ODD, "--"]
    assert env["GLOO_SOCKET_IFNAME"] == "lo"  # loopback rendezvous: the loopback interface
    assert "GLOO_SOCKET_IFNAME=lo" in capsys.readouterr().out
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0,ib1")
    slurm._node_main(["--nproc-per-node", "8", "--", "--config", "c.yaml"])
    assert calls[-1][2]["GLOO_SOCKET_IFNAME"] == "ib0,ib1"


def test_the_master_node_finds_its_interface_through_another_node(monkeypatch):
    asked = []
    monkeypatch.setattr(slurm, "interface_for", lambda address, port=9: asked.append(address) or "eth0")
    env = {"MASTER_ADDR": "node1", "MASTER_PORT": "22345", "CEGPPO_PEER_ADDR": "node2"}
    assert slurm.node_environment({**env, "SLURM_NODEID": "0"})["GLOO_SOCKET_IFNAME"] == "eth0"
    slurm.node_environment({**env, "SLURM_NODEID": "1"})
    slurm.node_environment({**env, "SLURM_NODEID": "0", "CEGPPO_PEER_ADDR": ""})  # one node
    assert asked == ["node2", "node1", "node1"]


def test_interface_lookup_gives_up_quietly():
    assert slurm.interface_for("127.0.0.1") == "lo"
    assert slurm.interface_for("no-such-host.invalid") is None


def test_signal_seconds_auto_from_the_measured_need(tmp_path, capsys):
    assert resolve_signal_seconds("auto", str(tmp_path)) == 300
    assert "no step time measured" in capsys.readouterr().err  # stdout: a dry run's script only
    clock = StopClock(step_seconds=[1200.0], save_seconds=[240.0])  # a large config
    save_timing(tmp_path, clock)
    need = clock.needed_seconds()
    assert resolve_signal_seconds("auto", str(tmp_path)) == int(need + 0.999) > 300
    assert resolve_signal_seconds("600", str(tmp_path)) == 600
    err = capsys.readouterr().err
    assert "warning: --signal-seconds 600 is shorter" in err
    assert resolve_signal_seconds("5000", str(tmp_path)) == 5000 and capsys.readouterr().err == ""
    save_timing(tmp_path, StopClock(step_seconds=[5.0], save_seconds=[3.0]))  # the tiny demo
    assert resolve_signal_seconds("auto", str(tmp_path)) == 300
    for bad in ("soon", "0", "-3"):
        with pytest.raises(ValueError):
            resolve_signal_seconds(bad, str(tmp_path))


def test_submit_renders_the_derived_lead(tmp_path, capsys):
    save_timing(tmp_path, StopClock(step_seconds=[1200.0], save_seconds=[240.0]))
    args = ["submit", "--config", "configs/tiny_cpu.yaml", "--nodes", "2", "--gpus-per-node", "0", "--dry-run",
            f"trainer.run_dir={tmp_path}"]
    assert main(args) == 0
    assert "#SBATCH --signal=B:USR1@1860" in capsys.readouterr().out  # 1.25 * 1440 + 60
    assert main(args[:-1] + ["--signal-seconds", "later", args[-1]]) == 2


@pytest.mark.parametrize("signal_name, text", [("USR1", "time-limit"), ("TERM", "preempt")])
def test_a_signal_to_the_batch_shell_asks_the_trainer_to_stop_and_requeues(tmp_path, signal_name, text):
    import signal
    import time

    bin_dir = _tools(tmp_path)
    log = tmp_path / "log"
    log.mkdir()
    run_dir = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(config="configs/tiny_cpu.yaml", overrides=[], run_dir=str(run_dir), nodes=1,
                                    gpus_per_node=0, time="10:00", python=str(bin_dir / "python"), procs_per_node=1))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1",
           "FAKE_LOG": str(log), "FAKE_RUN_DIR": str(run_dir), "FAKE_EXIT": "1", "FAKE_STOPPED": "1",
           "FAKE_WAIT_FOR_STOP": "1", "FAKE_END": "NONE"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    for _ in range(200):
        if (log / "started").exists():
            break
        time.sleep(0.05)
    proc.send_signal(getattr(signal, "SIG" + signal_name))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3, out
    assert f"{signal_name}: asking the trainer to save and stop" in out and "saved; requeueing job 7" in out
    assert (log / "stop_text").read_text().strip() == text
    assert (log / "requeued").read_text().split() == ["7"]


def test_torchrun_waits_for_a_save_as_long_as_the_stop_lead():
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "12345", "SLURM_NODEID": "1", "GLOO_SOCKET_IFNAME": "lo"}
    assert slurm.node_environment({**env, "CEGPPO_STOP_LEAD_SECONDS": "600"})["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "600"
    assert slurm.node_environment({**env, "CEGPPO_STOP_LEAD_SECONDS": "5"})["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "30"
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in slurm.node_environment(env)
    mine = {**env, "CEGPPO_STOP_LEAD_SECONDS": "600", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "90"}
    assert slurm.node_environment(mine)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "90"  # the user's wins
