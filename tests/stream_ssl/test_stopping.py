"""Stopping on purpose (stream_ssl/stopping.py, stream_ssl/launcher.py): the stop signals, the time-based checkpoint,
and `stream-ssl train --num-processes N`, whose exit status and one error line survive the launch."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from shard_tools.cli import USAGE
from stream_ssl import checkpoint, stopping
from stream_ssl.launcher import status_of
from stream_ssl.stopping import STOPPED, StopRequest, parse_signals
from stream_ssl.train import main
from tests.helpers import PYTHON
from tests.helpers.trainer import TRAIN, child_env, train_args


def test_parse_signals():
    assert parse_signals("TERM,INT,USR1") == (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    assert parse_signals("sigterm, 10") == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_signals("none") == parse_signals("") == ()
    with pytest.raises(ValueError, match="'TREM' is not a signal"):
        parse_signals("TREM")
    with pytest.raises(ValueError, match="cannot be caught"):
        parse_signals("TERM,KILL")


def test_the_first_signal_asks_the_second_stops_at_once(monkeypatch):
    with StopRequest((signal.SIGUSR1, signal.SIGINT)) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signal == signal.SIGUSR1  # recorded, the process goes on
        os.kill(os.getpid(), signal.SIGINT)  # within SAME_SIGNAL seconds: the first one delivered again
        assert stop.signal == signal.SIGUSR1
        monkeypatch.setattr(stopping, "SAME_SIGNAL", 0.0)
        with pytest.raises(KeyboardInterrupt):  # a second request: what SIGINT does without us
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_exit_status_of_a_process_killed_by_a_signal():
    assert status_of(-signal.SIGKILL) == 137 and status_of(2) == 2 and status_of(0) == 0


@pytest.mark.multiprocess
def test_time_based_checkpoints(make_shard_set, tmp_path, capsys):
    data = make_shard_set(64, shard_size=32)
    args = train_args(data, tmp_path / "run", budget_samples="96", log_with="none", keep_checkpoints=0,
                      save_every_minutes=1e-6)  # due after every step
    assert main(args) == 0
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*.pt"))
    assert names == [f"step-{s:08d}.pt" for s in range(1, 7)]
    assert main(args) == 0  # a rerun: finished, nothing changes
    assert "finished at step 6 of 6" in capsys.readouterr().out


@pytest.mark.multiprocess
def test_launcher_prints_one_error_line_and_keeps_the_status(tmp_path):
    cmd = [TRAIN, "--data", tmp_path / "nothing", "--out", tmp_path / "run", "--num-processes", "2",
           "--log-with", "none"]
    r = subprocess.run([str(c) for c in [PYTHON, *cmd]], env=child_env(), capture_output=True, text=True,
                       timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert r.returncode == USAGE and len(errors) == 1 and "nothing: no such file or folder" in errors[0], r.stderr


@pytest.mark.multiprocess
def test_launcher_passes_a_stop_signal_on(make_shard_set, tmp_path):
    data = make_shard_set(64, shard_size=32)
    out = tmp_path / "run"
    args = train_args(data, out, budget_samples="3200", batch_size=8, log_with="none", log_keys="true",
                      num_processes=2)
    proc = subprocess.Popen([str(c) for c in [PYTHON, TRAIN, *args]], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    keys, deadline = out / "keys" / "rank-1.txt", time.monotonic() + 300
    while not (keys.exists() and keys.stat().st_size > 0) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher only: it passes it on
    _, err = proc.communicate(timeout=300)
    ckpt = checkpoint.latest_checkpoint(out)
    assert proc.returncode == STOPPED and ckpt is not None, err[-3000:]
    assert f"by SIGTERM; checkpoint {ckpt}; run the same command to continue" in err
    assert err.count("stopped at step") == 1 and not (out / "summary.json").exists()
