"""Child processes of the shard tools: they die with the tool that started them.

A tool killed with SIGKILL cannot stop its children; a child left running (an img2dataset job, a pack worker)
would keep writing into the output folder while a re-run writes there too. `die_with_parent` asks Linux to
SIGKILL the calling process when its parent dies (PR_SET_PDEATHSIG); the helpers that write call it. Helpers
a library starts where we cannot reach them (img2dataset's logger process) carry a marker in their environment
instead: the next run in the same folder stops them (`stop_marked`).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# Tests: the tool is SIGKILLed part-way through its work (pack: mid-way through shard N + 1; crawl: once an
# img2dataset worker finished shard N, see crawl.CrawlSampleWriter).
KILL_ENV = "SHARD_TOOLS_TEST_KILL_AFTER_SHARDS"


def die_with_parent(parent: int) -> None:
    """Be SIGKILLed when the process `parent` (this process's parent) dies, even by SIGKILL; exit at once when it
    is already gone. Linux only (elsewhere nothing happens)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent:  # it died before we asked
        os._exit(1)


def marked(name: str, value: str) -> list[int]:
    """Live processes (zombies left out) whose environment sets `name` to `value`: the helpers a tool started
    with that marker, wherever they were re-parented. Linux (/proc) only; elsewhere none."""
    needle = f"{name}={value}\0".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) != os.getpid() and needle in (proc / "environ").read_bytes() \
                    and ") Z " not in (proc / "stat").read_text():
                found.append(int(proc.name))
        except (OSError, ValueError):  # gone meanwhile, or another user's
            continue
    return found


def stop_marked(name: str, value: str) -> int:
    """SIGKILL every process `marked(name, value)` finds; returns how many."""
    pids = marked(name, value)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(pids)
