"""The rendered batch script: every field filled, valid bash, the settings asked for."""

from __future__ import annotations

import subprocess

import pytest

from megatron_cegppo.cli import main
from megatron_cegppo.slurm import render_sbatch


def test_rendered_script_is_valid_bash_with_the_requested_settings(tmp_path):
    script = render_sbatch(config="configs/tiny_cpu.yaml", overrides=["algorithm.beta1=0.75"], run_dir=str(tmp_path),
                           nodes=4, gpus_per_node=8, time="2:00:00", partition="h100", signal_seconds=120)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --time=2:00:00",
                 "#SBATCH --partition=h100", "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue",
                 "PROCS_PER_NODE=8", "OVERRIDES=(algorithm.beta1=0.75)", "scontrol requeue",
                 "#SBATCH --exclusive", "#SBATCH --mem=0", "CEGPPO_STOP_LEAD_SECONDS=$STOP_LEAD_SECONDS",
                 "STOP_LEAD_SECONDS=120"):
        assert line in script, line
    assert "@@" not in script.replace("USR1@", "")
    # SRUN_CPUS_PER_TASK before srun (Slurm >= 22.05 does not pass --cpus-per-task on)
    assert script.index("export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK") < script.index("\nsrun ")
    # no inner shell re-reads the overrides
    assert "bash -c" not in script and '"${OVERRIDES[@]}"' in script
    # the requeue is decided from the trainer's marker, which a start clears first
    assert '[ -f "$RUN_DIR/STOPPED" ]' in script and 'rm -f "$RUN_DIR/STOP" "$RUN_DIR/STOPPED"' in script
    assert "-eq 3" not in script


def test_cpu_cluster_script_has_no_gpu_request(tmp_path):
    script = render_sbatch(config="configs/tiny_cpu.yaml", overrides=[], run_dir=str(tmp_path), nodes=2,
                           gpus_per_node=0, time="10:00", procs_per_node=1)
    assert "--gpus-per-node" not in script.split("set -uo")[0] and "PROCS_PER_NODE=1" in script


def test_submit_dry_run_prints_and_validates(tmp_path, capsys):
    args = ["submit", "--config", "configs/tiny_cpu.yaml", "--nodes", "1", "--gpus-per-node", "2", "--dry-run",
            f"trainer.run_dir={tmp_path}"]
    assert main(args) == 0
    assert "#SBATCH --nodes=1" in capsys.readouterr().out
    assert (tmp_path / "cegppo.sbatch").exists()
    # 3 nodes x 2 GPUs = 6 ranks cannot hold TP=2 x the demo's batch split: named before submitting
    assert main(["submit", "--config", "configs/tiny_cpu.yaml", "--nodes", "3", "--gpus-per-node", "2",
                 "--dry-run", "algorithm.micro_batch_size=48"]) == 2
