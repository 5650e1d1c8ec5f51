"""Shared helpers for the trainer/method tests: tiny method settings and subprocess runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from stream_ssl.testing.servers import free_port
from tests.helpers import REPO

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TRAIN = REPO / "stream_ssl" / "train.py"

# Small heads so that a CPU step takes milliseconds, and settings that make a 16-step loss trend readable:
# LARS lr per method, DINO with center momentum 0 and no teacher-temperature warm-up (the paper's center starts
# at zero and the warm-up moves the targets, both long-run stabilizers that dominate a 16-step curve).
TINY = {
    "simclr": ({"proj_hidden": 128, "proj_dim": 64, "temperature": 0.2}, "lars", 2.0),
    "mocov3": ({"proj_hidden": 128, "proj_dim": 64, "pred_hidden": 128, "temperature": 0.2}, "lars", 5.0),
    "byol": ({"proj_hidden": 128, "proj_dim": 64, "pred_hidden": 128}, "lars", 2.0),
    "barlow": ({"proj_hidden": 128, "proj_dim": 128}, "lars", 2.0),
    "vicreg": ({"proj_hidden": 128, "proj_dim": 128}, "lars", 2.0),
    "swav": ({"proj_hidden": 128, "proj_dim": 64, "prototypes": 32, "local_crops": 2,
              "freeze_prototypes_fraction": 0.0}, "lars", 2.0),
    "dino": ({"head_hidden": 128, "bottleneck": 64, "out_dim": 256, "local_crops": 2, "center_momentum": 0.0,
              "teacher_temp_warmup_fraction": 0.0}, "lars", 2.0),
}


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO, env=child_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def accelerate_cmd(script: Path | str, num_processes: int = 2) -> list[str]:
    """`accelerate launch` of two CPU processes over gloo (`--multi_gpu`: `--cpu --num_processes 2` starts one) of
    a script, or of a module given by name (`tests.helpers.fault_driver`, run from the repository root)."""
    target = ["-m", script] if isinstance(script, str) and not script.endswith(".py") else [str(script)]
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *target]


def node_env(node: int, nodes: int, port: int) -> dict:
    """What torchrun gives the one process of node `node` of `nodes` (simulated nodes: one process each, each
    with its own cache folder)."""
    return {"RANK": str(node), "WORLD_SIZE": str(nodes), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "GROUP_RANK": str(node), "GROUP_WORLD_SIZE": str(nodes), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def run_nodes(cmds: list[list], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Start `cmds[n]` as simulated node n of len(cmds), all at once (they form one gloo group); wait for all."""
    port = free_port()
    procs = [subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=child_env(**node_env(n, len(cmds), port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n, cmd in enumerate(cmds)]
    out = []
    for cmd, p in zip(cmds, procs):
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out


def train_args(data: Path, out: Path, method: str = "simclr", **flags) -> list[str]:
    options, optimizer, lr = TINY[method]
    args = {"data": data, "out": out, "method": method, "backbone": "test_resnet", "image_size": 32,
            "batch_size": 16, "optimizer": optimizer, "lr": lr, "num_workers": 0, "progress": "false",
            "method_options": __import__("json").dumps(options)}
    args.update(flags)
    return flags_of(args)


def flags_of(settings: dict) -> list[str]:
    """Command-line flags of train.py settings; booleans (True/False or "true"/"false") become switches."""
    cmd: list[str] = []
    for k, v in settings.items():
        flag = k.replace("_", "-")
        if isinstance(v, bool) or str(v).lower() in ("true", "false"):
            cmd.append(f"--{flag}" if str(v).lower() == "true" else f"--no-{flag}")
        else:
            cmd += [f"--{flag}", str(v)]
    return cmd
