"""Multi-node launch: the command of every node (dry run), SLURM parsing, config templates, the batch scripts,
and a 2-process CPU run through the same launcher."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import time

import pytest
import yaml

from launch.nodes import Topology, expand_nodelist, from_slurm, main, node_command, slurm_gpus
from tests.helpers import PYTHON, REPO
from tests.helpers.runs import TINY_BACKBONE
from tests.helpers.trainer import child_env, free_port

pytestmark = pytest.mark.multiprocess

TRAIN_ARGS = ["--config", "configs/demo.yaml", "--data", "s3://bucket/shards/pool", "--method-options",
              '{"proj_hidden": 256}', "--out", "runs/two nodes"]


def _dry(capsys, argv, env=None) -> list[str]:
    assert main(argv, env=env or {}) == 0
    return capsys.readouterr().out.splitlines()


def _opt(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def _node_lines(lines: list[str]) -> list[list[str]]:
    return [shlex.split(ln.split(": ", 1)[1].split("  # ")[0]) for ln in lines if ln.startswith("node ")]


def test_dry_run_prints_each_nodes_accelerate_command(capsys):
    lines = _dry(capsys, ["--nodes", "2", "--gpus-per-node", "8", "--main-address", "node001", "--main-port",
                          "29555", "--dry-run", "--", *TRAIN_ARGS])
    cmds = _node_lines(lines)
    assert len(cmds) == 2
    for rank, cmd in enumerate(cmds):
        assert cmd[0].endswith("accelerate") and cmd[1] == "launch"
        assert _opt(cmd, "--config_file").endswith("launch/accelerate/multi_node.yaml")
        assert _opt(cmd, "--num_machines") == "2" and _opt(cmd, "--num_processes") == "16"
        assert _opt(cmd, "--main_process_ip") == "node001" and _opt(cmd, "--main_process_port") == "29555"
        assert _opt(cmd, "--machine_rank") == str(rank) and "--multi_gpu" in cmd
        script = cmd.index(str(REPO / "stream_ssl" / "train.py"))
        assert cmd[script + 1:] == TRAIN_ARGS  # passed through verbatim (quotes, spaces, URLs)
    assert "16" in lines[0] and "node001:29555" in lines[0]


def test_dry_run_single_node_templates(capsys):
    one = _node_lines(_dry(capsys, ["--gpus-per-node", "1", "--dry-run", "--", "--out", "r"]))[0]
    assert _opt(one, "--config_file").endswith("single_gpu.yaml") and "--machine_rank" not in one
    four = _node_lines(_dry(capsys, ["--gpus-per-node", "4", "--dry-run", "--", "--out", "r"]))[0]
    assert _opt(four, "--config_file").endswith("multi_gpu.yaml") and "--multi_gpu" in four
    assert _opt(four, "--num_processes") == "4"


def test_slurm_environment_gives_nodes_rank_address_and_gpus(capsys):
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_GPUS_ON_NODE": "4", "PATH": "/nonexistent"}  # no scontrol: the node list is parsed here
    assert from_slurm(env) == (2, 1, "gpu07", 4)
    lines = _dry(capsys, ["--slurm", "--launcher", "torchrun", "--dry-run", "--", "--out", "r"], env=env)
    node_lines = [ln for ln in lines if ln.startswith("node ")]
    assert node_lines[1].endswith("# this node") and not node_lines[0].endswith("# this node")
    cmd = _node_lines(lines)[1]
    assert cmd[0].endswith("torchrun") or cmd[-4:-2] == ["-m", "torch.distributed.run"]
    assert _opt(cmd, "--nnodes") == "2" and _opt(cmd, "--nproc_per_node") == "4" and _opt(cmd, "--node_rank") == "1"
    assert _opt(cmd, "--master_addr") == "gpu07" and cmd[-2:] == ["--out", "r"]
    with pytest.raises(SystemExit):
        main(["--slurm", "--dry-run", "--", "--out", "r"], env={})  # not in an allocation: a clear error


def test_nodelist_and_gpu_parsing():
    assert expand_nodelist("gpu[07-08,10],cpu1") == ["gpu07", "gpu08", "gpu10", "cpu1"]
    assert expand_nodelist("n[1-2]-ib,login") == ["n1-ib", "n2-ib", "login"]
    assert expand_nodelist("node001") == ["node001"]
    assert slurm_gpus({"SLURM_GPUS_PER_NODE": "a100:8"}) == 8
    assert slurm_gpus({"SLURM_GPUS_ON_NODE": "4"}) == 4 and slurm_gpus({}) is None
    with pytest.raises(ValueError):
        node_command(Topology(2, 8, "h"), 2, [])


def test_accelerate_templates_and_batch_scripts():
    for name, kind, machines in (("single_gpu", "NO", 1), ("multi_gpu", "MULTI_GPU", 1),
                                 ("multi_node", "MULTI_GPU", 2)):
        cfg = yaml.safe_load((REPO / "launch" / "accelerate" / f"{name}.yaml").read_text())
        assert cfg["distributed_type"] == kind and cfg["num_machines"] == machines
        assert cfg["mixed_precision"] == "no"  # train.py --precision decides
    sbatch = (REPO / "launch" / "slurm_train.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in sbatch and "srun" in sbatch and "launch/nodes.py --slurm" in sbatch
    torchrun = (REPO / "launch" / "torchrun_train.sh").read_text()
    assert "torchrun" in torchrun and "NODE_RANK" in torchrun
    for script in ("slurm_train.sbatch", "torchrun_train.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "launch" / script)]).returncode == 0


def test_slurm_batch_script_dry_run_prints_the_command_of_each_node(tmp_path):
    """The batch script under a fake srun (one task per node) and scontrol: every node prints its command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A long host list: reading only its first line through `| head` under pipefail dies of SIGPIPE (exit 141).
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu07\\ngpu08\\n'\n"
                                      "for i in $(seq 10 5000); do echo gpu$i; done\n")
    (bin_dir / "srun").write_text("#!/bin/bash\necho \"srun options: $*\" >&2\nwhile [[ $1 == -* ]]; do shift; done\n"
                                  "for i in 0 1; do SLURM_NODEID=$i \"$@\" || exit 1; done\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = child_env(PATH=f"{bin_dir}:{REPO / '.venv' / 'bin'}:/usr/bin:/bin", SLURM_JOB_NODELIST="gpu[07-08]",
                    SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="24")
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm_train.sbatch"), "--dry-run", *TRAIN_ARGS],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--cpus-per-task=24" in proc.stderr  # srun is told the job's cores per task (not one core for all)
    mine = [ln for ln in proc.stdout.splitlines() if ln.endswith("# this node")]
    assert len(mine) == 2  # each of the two tasks marks its own line
    for rank, line in enumerate(mine):
        assert line.startswith(f"node {rank}: ")
        cmd = _node_lines([line])[0]
        assert _opt(cmd, "--machine_rank") == str(rank) and _opt(cmd, "--main_process_ip") == "gpu07"
        assert _opt(cmd, "--num_processes") == "16" and cmd[-len(TRAIN_ARGS):] == TRAIN_ARGS


def test_slurm_batch_script_stops_the_step_and_requeues_on_usr1(tmp_path):
    """SLURM's early warning (USR1 to the batch shell): the script passes SIGTERM to the step, whose training
    processes checkpoint and exit 75, and requeues the job; a step that ends by itself is not requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\nif [ \"$1\" = requeue ]; then echo \"$*\" >> {tmp_path}/calls; "
                                      "else echo gpu07; fi\n")
    # the step: a training run that stops with status 75 on SIGTERM, or finishes after a while
    (bin_dir / "srun").write_text(f"#!/bin/bash\ntrap 'exit 75' TERM\ntouch {tmp_path}/started\n"
                                  "for i in $(seq 1 ${STEP_TICKS:-600}); do sleep 0.05; done\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = child_env(PATH=f"{bin_dir}:/usr/bin:/bin", SLURM_JOB_NODELIST="gpu07", SLURM_JOB_ID="42",
                    SLURM_SUBMIT_DIR=str(REPO))
    script = ["bash", str(REPO / "launch" / "slurm_train.sbatch"), *TRAIN_ARGS]
    proc = subprocess.Popen(script, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and (tmp_path / "calls").read_text() == "requeue 42\n", err
    (tmp_path / "calls").unlink()
    done = subprocess.run(script, cwd=tmp_path, env={**env, "STEP_TICKS": "2"}, capture_output=True, timeout=60)
    assert done.returncode == 0 and not (tmp_path / "calls").exists()


def test_two_cpu_processes_through_the_launcher(make_shard_set, tmp_path):
    pool = make_shard_set(200, shard_size=100, seed=31)
    run = tmp_path / "ddp"
    cmd = [PYTHON, str(REPO / "launch" / "nodes.py"), "--procs-per-node", "2", "--main-port", str(free_port()), "--",
           "--data", str(pool), "--unique-samples", "100", "--budget-samples", "128", "--batch-size", "16",
           "--backbone", TINY_BACKBONE, "--image-size", "32", "--num-workers", "0", "--no-progress",
           "--log-with", "none", "--method-options", '{"proj_hidden": 64}', "--log-keys",
           "--out", str(run)]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--multi_gpu" in proc.stderr and "--num_processes 2" in proc.stderr  # the command it ran
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 128 // 32
    for r in (0, 1):  # both processes trained every step on their share of the global batch
        steps = [ln.split()[0] for ln in (run / "keys" / f"rank-{r}.txt").read_text().splitlines()]
        assert sorted(set(steps), key=int) == ["0", "1", "2", "3"] and len(steps) == 4 * 16
