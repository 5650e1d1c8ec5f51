r"""Start train.py on one node or many: builds the `accelerate launch` (or `torchrun`) command of each node.

    # on every node (rank 0 and 1), or let SLURM do it (launch/slurm_train.sbatch):
    python launch/nodes.py --nodes 2 --gpus-per-node 8 --node-rank 0 --main-address node001 -- \
        --config configs/demo.yaml --data s3://bucket/shards/pool --out runs/big
    # print the exact command every node runs, start nothing:
    python launch/nodes.py --nodes 2 --gpus-per-node 8 --main-address node001 --dry-run -- --data ... --out ...
    # inside a SLURM allocation (srun, one task per node): nodes, rank, address and GPUs come from SLURM
    python launch/nodes.py --slurm -- --data ... --out ...
    # two CPU processes over gloo (what CI runs): the same path
    python launch/nodes.py --procs-per-node 2 -- --data shards/pool --out runs/ddp ...

Everything after `--` goes to train.py unchanged. The Accelerate config templates are in launch/accelerate/
(single_gpu.yaml, multi_gpu.yaml, multi_node.yaml); the per-node values (machine rank, main address, totals) are
passed on the command line, which overrides the file. `--launcher torchrun` builds the equivalent torchrun
command (static rendezvous: node rank + main address). On a machine without GPUs, several processes per node
are CPU processes over gloo (train.py asks Accelerate for CPU mode; `accelerate launch --cpu` would start one).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "launch" / "accelerate"
TRAIN = REPO / "stream_ssl" / "train.py"
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Topology:
    nodes: int
    procs_per_node: int
    main_address: str
    main_port: int = DEFAULT_PORT

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compact host list (`gpu[07-08,10],cpu1`) as host names, in order (`scontrol show hostnames`)."""
    hosts, i, text = [], 0, text.strip()
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):  # split on commas outside brackets
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    for part in filter(None, (p.strip() for p in parts)):
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, sep, hi = r.partition("-")
            if not sep:
                hosts.extend(expand_nodelist(prefix + lo + suffix))
                continue
            width = len(lo)
            for n in range(int(lo), int(hi) + 1):
                hosts.extend(expand_nodelist(f"{prefix}{n:0{width}d}{suffix}"))
    return hosts


def first_host(nodelist: str) -> str:
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 check=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"cannot read a host from the SLURM node list {nodelist!r}")
    return hosts[0]


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def slurm_gpus(env: dict) -> int | None:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key)
        if value:
            m = re.search(r"(\d+)(?:\(.*\))?$", value.split(",")[0])  # "8", "a100:8", "8(x2)"
            if m:
                return int(m.group(1))
    return None


def from_slurm(env: dict) -> tuple[int, int, str, int | None]:
    """(nodes, this node's rank, main address, GPUs per node or None) from a SLURM task's environment."""
    missing = [k for k in ("SLURM_NODEID", "SLURM_JOB_NODELIST") if k not in env]
    if missing:
        raise ValueError(f"--slurm: {', '.join(missing)} not set; run inside an allocation (srun, sbatch)")
    nodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    return nodes, int(env["SLURM_NODEID"]), first_host(env["SLURM_JOB_NODELIST"]), slurm_gpus(env)


def _tool(name: str, module: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


def template_for(topo: Topology) -> Path:
    if topo.nodes > 1:
        return TEMPLATES / "multi_node.yaml"
    return TEMPLATES / ("multi_gpu.yaml" if topo.procs_per_node > 1 else "single_gpu.yaml")


def node_command(topo: Topology, node_rank: int, train_args: list[str], launcher: str = "accelerate",
                 config_file: Path | None = None, script: Path = TRAIN) -> list[str]:
    """The command node `node_rank` runs."""
    if not 0 <= node_rank < topo.nodes:
        raise ValueError(f"node rank {node_rank} is outside 0..{topo.nodes - 1}")
    if launcher == "accelerate":
        cmd = _tool("accelerate", "accelerate.commands.launch")
        if cmd[-1] != "accelerate.commands.launch":
            cmd.append("launch")
        cmd += ["--config_file", str(config_file or template_for(topo)),
                "--num_machines", str(topo.nodes), "--num_processes", str(topo.world_size)]
        if topo.world_size > 1:
            cmd += ["--multi_gpu", "--machine_rank", str(node_rank), "--main_process_ip", topo.main_address,
                    "--main_process_port", str(topo.main_port)]
        return cmd + [str(script), *train_args]
    if launcher == "torchrun":
        cmd = _tool("torchrun", "torch.distributed.run")
        return cmd + ["--nnodes", str(topo.nodes), "--nproc_per_node", str(topo.procs_per_node),
                      "--node_rank", str(node_rank), "--master_addr", topo.main_address,
                      "--master_port", str(topo.main_port), str(script), *train_args]
    raise ValueError(f"unknown launcher {launcher!r}; choose accelerate or torchrun")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/nodes.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, help="machines (default 1; --slurm: SLURM_NNODES)")
    p.add_argument("--gpus-per-node", "--procs-per-node", dest="procs", type=int,
                   help="processes per node, one per GPU (default: the visible GPUs, at least 1; --slurm: "
                        "SLURM_GPUS_ON_NODE)")
    p.add_argument("--node-rank", type=int, help="this node's rank (default 0; --slurm: SLURM_NODEID)")
    p.add_argument("--main-address", help="address of node 0 (default 127.0.0.1 on one node; --slurm: the first "
                                          "host of SLURM_JOB_NODELIST)")
    p.add_argument("--main-port", type=int, default=int(os.environ.get("MAIN_PORT", DEFAULT_PORT)))
    p.add_argument("--launcher", choices=("accelerate", "torchrun"), default="accelerate")
    p.add_argument("--config-file", type=Path, help="Accelerate config (default: a template from launch/accelerate)")
    p.add_argument("--script", type=Path, default=TRAIN, help="training script (default stream_ssl/train.py)")
    p.add_argument("--slurm", action=argparse.BooleanOptionalAction, default=False,
                   help="read nodes, node rank, main address, GPUs from SLURM (default: off)")
    p.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=False,
                   help="print the command of every node and exit (default: off)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the train.py arguments")
    return p


def main(argv: list[str] | None = None, env: dict | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    env = dict(os.environ if env is None else env)
    train_args = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    nodes, rank, address, gpus = a.nodes, a.node_rank, a.main_address, a.procs
    try:
        if a.slurm:
            s_nodes, s_rank, s_address, s_gpus = from_slurm(env)
            nodes = nodes or s_nodes
            rank = s_rank if rank is None else rank
            address = address or s_address
            gpus = gpus or s_gpus
    except ValueError as e:
        p.error(str(e))
    nodes = nodes or 1
    rank = rank or 0
    procs = gpus or max(1, visible_gpus())
    if nodes > 1 and not address:
        p.error("--main-address is required with --nodes > 1 (or use --slurm)")
    if nodes < 1 or procs < 1:
        p.error("--nodes and --gpus-per-node must be >= 1")
    topo = Topology(nodes, procs, address or "127.0.0.1", a.main_port)
    try:
        commands = [node_command(topo, r, train_args, a.launcher, a.config_file, a.script) for r in range(nodes)]
    except ValueError as e:
        p.error(str(e))
    if not 0 <= rank < nodes:
        p.error(f"--node-rank {rank} is outside 0..{nodes - 1}")
    if a.dry_run:
        print(f"# {nodes} node(s) x {procs} process(es) = {topo.world_size}; main {topo.main_address}:"
              f"{topo.main_port}; launcher {a.launcher}; run from {REPO}")
        for r, cmd in enumerate(commands):
            mark = "  # this node" if (a.slurm or a.node_rank is not None) and r == rank else ""
            print(f"node {r}: {shlex.join(cmd)}{mark}")
        return 0
    print(f"[launch] node {rank} of {nodes}: {shlex.join(commands[rank])}", file=sys.stderr, flush=True)
    return subprocess.call(commands[rank], cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
