"""``megatron-cegppo submit``: renders the batch template for a config and submits it.

The template ships inside the package (``megatron_cegppo/templates/cegppo.sbatch``), since an
installed wheel has no checkout around it; ``slurm/cegppo.sbatch`` is the same file, to read.

Also the per-node launcher that the batch script's ``srun`` starts on every node
(``python -m megatron_cegppo.slurm node ...``): it reads the node's rank from Slurm's
environment, picks the network interface for gloo, and replaces itself with torchrun. The
trainer's arguments travel as an argument vector from the batch script to torchrun: no shell
parses them a second time, so a value with spaces, quotes or ``<>`` arrives as written.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Mapping, Optional, Sequence

TEMPLATE = resources.files("megatron_cegppo") / "templates" / "cegppo.sbatch"
DEFAULT_SIGNAL_SECONDS = 300


def render_sbatch(
    *, config: str, overrides: Sequence[str], run_dir: str, nodes: int, gpus_per_node: int,
    time: str, partition: Optional[str] = None, job_name: str = "cegppo", signal_seconds: int = DEFAULT_SIGNAL_SECONDS,
    cpus_per_task: int = 64, procs_per_node: Optional[int] = None, python: str = sys.executable,
    log_dir: Optional[str] = None,
) -> str:
    """The batch script for a run; ``procs_per_node`` defaults to one process per GPU."""
    if nodes < 1 or gpus_per_node < 0:
        raise ValueError("nodes must be >= 1 and gpus_per_node >= 0")
    fields = {
        "JOB_NAME": job_name, "NODES": str(nodes), "GPUS_PER_NODE": str(gpus_per_node),
        "CPUS_PER_TASK": str(cpus_per_task), "TIME": time, "SIGNAL_SECONDS": str(signal_seconds),
        "LOG_DIR": shlex.quote(log_dir or f"{run_dir}/logs"), "RUN_DIR": shlex.quote(run_dir),
        "CONFIG": shlex.quote(str(Path(config).resolve())), "PYTHON": shlex.quote(python),
        "OVERRIDES": " ".join(shlex.quote(o) for o in overrides),
        "PROCS_PER_NODE": str(procs_per_node or max(1, gpus_per_node)),
        "PARTITION_LINE": f"#SBATCH --partition={partition}" if partition else "",
    }
    text = TEMPLATE.read_text(encoding="utf-8")
    for key, value in fields.items():
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text.replace("USR1@", ""):
        raise RuntimeError("an sbatch template field was left unfilled")
    if gpus_per_node == 0:  # CPU clusters (and the local test cluster)
        text = text.replace("#SBATCH --gpus-per-node=0\n", "")
    return text


def submit(script: str, out_path: Path, dry_run: bool) -> Optional[str]:
    """Writes the script and submits it; returns the job id (``None`` on a dry run)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(script)
    if dry_run:
        print(script)
        return None
    result = subprocess.run(["sbatch", "--parsable", str(out_path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job {job_id} ({out_path})")
    return job_id


# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit
_TIME_LIMIT = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}")
_NO_TIME_LIMIT = ("unlimited", "infinite")


def time_limit_problem(text: str) -> Optional[str]:
    """Why sbatch would refuse ``--time text``, or None."""
    if text.lower() in _NO_TIME_LIMIT or _TIME_LIMIT.fullmatch(text):
        return None
    return (f"--time must be a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or "
            f"UNLIMITED), got {text!r}")


def signal_seconds_problem(text: str) -> Optional[str]:
    """Why ``--signal-seconds text`` is neither ``auto`` nor a positive number of seconds, or None."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        seconds = int(text)
    except ValueError:
        return f"--signal-seconds must be 'auto' or a number of seconds, got {text!r}"
    return None if seconds > 0 else f"--signal-seconds must be positive, got {seconds}"


def resolve_signal_seconds(requested: str, run_dir: str) -> int:
    """``--signal-seconds``: ``auto`` takes the time that one more step and a save needed
    in a previous start of this run (``<run_dir>/timing.json``), at least the default; an
    explicit value shorter than that need is kept, with a warning. Raises ``ValueError``
    for a value that is neither ``auto`` nor a positive number of seconds."""
    from megatron_cegppo.trainer.stopping import load_timing

    clock = load_timing(run_dir)
    needed = clock.needed_seconds() if clock else None
    if str(requested).strip().lower() == "auto":
        if needed is None:
            print(f"note: --signal-seconds auto: no step time measured yet in {run_dir}, using "
                  f"{DEFAULT_SIGNAL_SECONDS} s", file=sys.stderr)
            return DEFAULT_SIGNAL_SECONDS
        seconds = max(DEFAULT_SIGNAL_SECONDS, math.ceil(needed))
        print(f"note: --signal-seconds auto: {seconds} s (one step and a save needed {needed:.0f} s in a "
              f"previous start, {Path(run_dir) / 'timing.json'})", file=sys.stderr)
        return seconds
    try:
        seconds = int(requested)
    except ValueError:
        raise ValueError(f"--signal-seconds must be 'auto' or a number of seconds, got {requested!r}") from None
    if seconds <= 0:
        raise ValueError(f"--signal-seconds must be positive, got {seconds}")
    if needed is not None and seconds < needed:
        print(f"warning: --signal-seconds {seconds} is shorter than the {needed:.0f} s that one step and a save "
              f"needed in a previous start: a stop signal may come too late to save "
              f"(--signal-seconds auto derives it)", file=sys.stderr)
    return seconds


# --- per node, started by srun ----------------------------------------------------------------

def interface_for(address: str, port: int = 9) -> Optional[str]:
    """The name of this machine's network interface that traffic to ``address`` leaves from
    (``lo`` for a loopback address), or ``None`` when it cannot be told (no route, IPv6, not
    Linux). A UDP ``connect`` picks the source address without sending anything; on the
    master node itself that is the address of its own network interface, not loopback."""
    try:
        ip = socket.gethostbyname(address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, port))
            source = s.getsockname()[0]
    except OSError:
        return None
    return _interface_with_address(source)


def _interface_with_address(ip: str) -> Optional[str]:
    try:
        import fcntl
        import struct
    except ImportError:
        return None
    SIOCGIFADDR = 0x8915
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == ip:
                return name
    return None


def node_command(python: str, procs_per_node: int, trainer_args: Sequence[str],
                 environ: Mapping[str, str]) -> list:
    """torchrun's argument vector on one node: the node's rank and the node count from
    Slurm's per-node environment, the rendezvous from the batch script's."""
    return [python, "-m", "torch.distributed.run", f"--nnodes={environ['SLURM_NNODES']}",
            f"--node-rank={environ['SLURM_NODEID']}", f"--nproc-per-node={procs_per_node}",
            f"--master-addr={environ['MASTER_ADDR']}", f"--master-port={environ['MASTER_PORT']}",
            "-m", "megatron_cegppo.cli", "train", *trainer_args]


def node_environment(environ: Mapping[str, str]) -> dict:
    """The environment for torchrun: ``GLOO_SOCKET_IFNAME`` (gloo groups of vLLM and
    megatron cross nodes) defaults to the interface that reaches another node: ``MASTER_ADDR``,
    or on the master node itself the allocation's second host (``CEGPPO_PEER_ADDR``, from the
    batch script), since a node may resolve its own name to a loopback address (Debian's
    ``127.0.1.1``). One set by the user wins. Gloo takes interface names (a comma-separated
    list is used round robin), not NCCL's ``^lo,docker`` exclusion syntax, hence a name found
    per node."""
    env = dict(environ)
    # torchrun gives its ranks 30 s after passing on a SIGTERM before it kills them: shorter
    # than a large save, which a stop signal lets finish. The stop lead is the time the batch
    # script reserves for one more step and a save.
    lead = env.get("CEGPPO_STOP_LEAD_SECONDS", "")
    if not env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") and lead.isdigit():
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(max(30, int(lead)))
    if not env.get("GLOO_SOCKET_IFNAME"):
        peer = env["MASTER_ADDR"]
        if env.get("SLURM_NODEID") == "0" and env.get("CEGPPO_PEER_ADDR"):
            peer = env["CEGPPO_PEER_ADDR"]
        name = interface_for(peer, int(env.get("MASTER_PORT", "9")))
        if name:
            env["GLOO_SOCKET_IFNAME"] = name
    return env


def _node_main(argv: Sequence[str]) -> int:
    """``python -m megatron_cegppo.slurm node --nproc-per-node N -- <train arguments>``: what
    follows ``--`` goes to the trainer untouched."""
    import argparse

    argv = list(argv)
    if "--" not in argv:
        sys.exit("usage: python -m megatron_cegppo.slurm node --nproc-per-node N -- <train arguments>")
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m megatron_cegppo.slurm node")
    p.add_argument("--nproc-per-node", type=int, required=True)
    args = p.parse_args(argv[:cut])
    trainer_args = argv[cut + 1:]
    env = node_environment(os.environ)
    cmd = node_command(sys.executable, args.nproc_per_node, trainer_args, env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"[cegppo] node {env['SLURM_NODEID']}/{env['SLURM_NNODES']}: GLOO_SOCKET_IFNAME="
          f"{env.get('GLOO_SOCKET_IFNAME', '(unset)')}, CPUs usable={cpus}", flush=True)
    os.execve(cmd[0], cmd, env)  # torchrun takes this process's place: srun's signals reach it
    return 1  # not reached


if __name__ == "__main__":
    if sys.argv[1:2] != ["node"]:
        sys.exit("usage: python -m megatron_cegppo.slurm node --nproc-per-node N -- <train arguments>")
    sys.exit(_node_main(sys.argv[2:]))
