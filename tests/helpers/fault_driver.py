"""train.py with faults injected at chosen points, for tests/faults: `python -m tests.helpers.fault_driver` from the
repository root (also under `accelerate launch -m`); the arguments are train.py's, the faults come from the
environment.

    FAULT_DELETE=STEP:PATH[,PATH...]   delete these files (or s3:// objects) once optimizer step STEP (1-based) is
                                       done (main process)
    FAULT_KILL_AT_STEP=STEP            every process SIGKILLs itself once step STEP is done, before its checkpoint
    FAULT_KILL_AFTER_CHECKPOINT=STEP   every process SIGKILLs itself right after checkpoint STEP is written
    FAULT_KILL_IN_CHECKPOINT=STEP      the main process SIGKILLs itself half-way through writing checkpoint STEP
                                       (after 64 KiB of it were written); the launcher stops the others
    FAULT_KILL_IN_UPLOAD=STEP          with --out on S3: the main process SIGKILLs itself while it uploads checkpoint
                                       STEP (a multipart upload begun, half of it sent, never completed)
    FAULT_SIGNAL_AT_STEP=STEP:NAME     once step STEP is done, the main process sends signal NAME (TERM, INT, ...)
                                       to its whole process group (loader workers included), as a terminal's
                                       Ctrl-C or SLURM does: start the run in a session of its own

Everything else is train.py's own code path: `main()` with its one-line errors and exit statuses.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from shard_tools.storage import filesystem, is_url
from stream_ssl import checkpoint, checkpointer, train

TORN_BYTES = 64 << 10


def _kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _after_step(hook) -> None:
    """Call `hook(done)` after every optimizer step (done = steps finished), before fit saves or logs it."""
    original = train.train_step

    def train_step(run, step, meter, keys=None):
        info = original(run, step, meter, keys)
        if keys is not None:
            keys.file.flush()
        hook(run, step + 1)
        return info

    train.train_step = train_step


def delete_files(spec: str) -> None:
    step, _, paths = spec.partition(":")

    def hook(run, done: int) -> None:
        if done == int(step) and run.acc.is_main_process:
            for p in paths.split(","):
                if is_url(p):
                    filesystem(p, run.storage).rm_file(p)
                else:
                    Path(p).unlink()
        run.acc.wait_for_everyone()

    _after_step(hook)


def signal_at_step(spec: str) -> None:
    step, _, name = spec.partition(":")

    def hook(run, done: int) -> None:
        if done == int(step) and run.acc.is_main_process:
            os.killpg(os.getpgrp(), signal.Signals["SIG" + name])

    _after_step(hook)


def kill_at_step(step: str) -> None:
    _after_step(lambda run, done: _kill() if done == int(step) else None)


class _Torn:
    """A file that kills the process once `after` bytes were written (and flushed out of Python's buffer)."""

    def __init__(self, f, after: int):
        self.f, self.after, self.written = f, after, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.written += n
        if self.written >= self.after:
            self.f.flush()  # in the kernel's hands: a SIGKILL does not lose it
            _kill()
        return n

    def flush(self) -> None:
        self.f.flush()


def kill_after_checkpoint(step: str) -> None:
    original = checkpointer.save

    def save(run, done: int, ended: str | None = None) -> None:
        original(run, done, ended)
        if done == int(step):
            _kill()

    checkpointer.save = save


def kill_in_checkpoint(step: str) -> None:
    original = checkpoint._write_atomic
    name = f"step-{int(step):08d}.pt"

    def write_atomic(path: Path, write) -> None:
        if path.name == name:
            return original(path, lambda f: write(_Torn(f, TORN_BYTES)))
        return original(path, write)

    checkpoint._write_atomic = write_atomic


def kill_in_upload(step: str) -> None:
    from stream_ssl import runfolder

    original = runfolder.RemoteRunFolder._put
    name = f"checkpoints/step-{int(step):08d}.pt"

    def put(self, path: Path, target: str) -> None:
        if target == name:
            fs, data = self.out.fs, path.read_bytes()
            bucket, key, _ = fs.split_path(self.out.location(target))
            upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
            fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1,
                       Body=data[: len(data) // 2])
            _kill()
        original(self, path, target)

    runfolder.RemoteRunFolder._put = put


def main() -> int:
    if os.environ.get("FAULT_DELETE"):
        delete_files(os.environ["FAULT_DELETE"])
    if os.environ.get("FAULT_KILL_AT_STEP"):
        kill_at_step(os.environ["FAULT_KILL_AT_STEP"])
    if os.environ.get("FAULT_KILL_IN_CHECKPOINT"):
        kill_in_checkpoint(os.environ["FAULT_KILL_IN_CHECKPOINT"])
    if os.environ.get("FAULT_KILL_AFTER_CHECKPOINT"):
        kill_after_checkpoint(os.environ["FAULT_KILL_AFTER_CHECKPOINT"])
    if os.environ.get("FAULT_KILL_IN_UPLOAD"):
        kill_in_upload(os.environ["FAULT_KILL_IN_UPLOAD"])
    if os.environ.get("FAULT_SIGNAL_AT_STEP"):
        signal_at_step(os.environ["FAULT_SIGNAL_AT_STEP"])
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
