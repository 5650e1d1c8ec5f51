"""What every command shares: one-line errors with the traceback in a log, and the console scripts.

`run_main` runs a command's body: a library error becomes one line `error: REASON (traceback: LOG)` on stderr
and an exit status (1: the run failed; 2: bad usage, as argparse exits), and the traceback, redacted, goes
to a log: `OUT/.logs/TOOL.log` when the command has a local output folder that exists (a training run's folder
is made for it), else `TOOL.log` in the user's own log folder (~/.local/state/stream-ssl/logs). Library
functions raise ordinary exceptions (ToolError and its subclasses, ValueError, OSError, ...), so a program
calling them catches them with `except Exception`.

`dispatch` is the console scripts' entry: `shard-tools pack ...` runs `shard_tools.pack.main([...])` with the
rest of the command line, as `python shard_tools/pack.py ...` does.
"""

from __future__ import annotations

import argparse
import importlib
import os
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from shard_tools.errors import ToolError
from shard_tools.storage import is_url, redact

FAILED, USAGE, DIVERGED, INTERRUPTED = 1, 2, 3, 130  # DIVERGED: a training run whose loss stopped being finite
ERROR_FILE = "STREAM_SSL_ERROR_FILE"  # set by stream_ssl/launcher.py for the processes it starts
_invoked_as: str | None = None  # "shard-tools pack" while `dispatch` runs a command


def tool_prog(default: str) -> str:
    """The program name a command's --help shows: `shard-tools pack` under the console script, else `default`."""
    return _invoked_as or default


def progress_switch(p: argparse.ArgumentParser, default: bool | None = None) -> None:
    """`--progress/--no-progress`; the default None shows the bar when stderr is a terminal."""
    when = {None: "on a terminal", True: "on", False: "off"}[default]
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=default,
                   help=f"show a progress bar on stderr (default: {when})")


def log_path(tool: str, folder: str | Path | None = None, create: bool = False) -> Path:
    """Where `tool` writes a failure's traceback: FOLDER/.logs/TOOL.log when `folder` is a local folder that exists
    (or, with `create`, one the command would make: a training run's folder, whose docs promise its log there);
    else the user's own log folder (`private_log_folder`), never a shared name in the temp folder."""
    if folder is not None and not is_url(str(folder)) and (create or Path(folder).is_dir()):
        return Path(folder) / ".logs" / f"{tool}.log"
    return private_log_folder() / f"{tool}.log"


def private_log_folder() -> Path:
    """$XDG_STATE_HOME/stream-ssl/logs (default ~/.local/state/stream-ssl/logs); without a usable home, a folder of
    this user's own in the temp folder (stream-ssl-UID, mode 0700, refused when it is a link or another user's)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    folder = Path(state) / "stream-ssl" / "logs"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    folder = Path(tempfile.gettempdir()) / f"stream-ssl-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{folder} is not a private folder of this user (a link, or open to others)")
    return folder


def write_log(tool: str, error: BaseException, folder: str | Path | None = None, create: bool = False) -> str:
    """Append the redacted traceback of `error` to the tool's log; returns where it went (or why not). Logs are
    opened without following links (a planted link cannot redirect what is written)."""
    text = redact("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    header = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {tool} (pid {os.getpid()}) failed\n"
    reason = "no log written"
    for where in dict.fromkeys((folder, None)):
        try:
            path = log_path(tool, where, create)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            with open(fd, "a") as f:
                f.write(header + text)
            return str(path)
        except OSError as e:
            reason = f"no log written: {e.strerror or e}"
    return reason


def error_line(error: BaseException, usage_errors: tuple[type[BaseException], ...] = ()) -> str:
    """The first line of the reason `error` gives, redacted; the type is named unless it is one of ours. An
    error raised in a DataLoader worker arrives with the worker's traceback in its text: its last line is the
    reason."""
    text = str(error).strip() or type(error).__name__
    if "Original Traceback (most recent call last)" in text:
        return redact(text.splitlines()[-1].strip())
    if not isinstance(error, (ToolError, *usage_errors)):
        text = f"{type(error).__name__}: {text}"
    lines = text.splitlines()
    return redact(lines[0] + (" ..." if len(lines) > 1 else ""))


def report(line: str) -> None:
    """A command's error line: on stderr, or, in a process started by `stream-ssl train --num-processes`, in the
    file ERROR_FILE names, from which the launcher prints the first failed process's line once."""
    path = os.environ.get(ERROR_FILE)
    if path:
        try:
            Path(path).write_text(line + "\n")
            return
        except OSError:
            pass
    print(line, file=sys.stderr, flush=True)


def run_main(tool: str, body: Callable[[], int | None], log_folder: str | Path | None = None,
             usage_errors: tuple[type[BaseException], ...] = (),
             exit_codes: dict[type[BaseException], int] | None = None, create_log_folder: bool = False) -> int:
    """Run `body()` (the command after its arguments are parsed) and return the exit status.

    `tool` names the log (`pack` -> pack.log); `log_folder` is the command's output folder, if it has one
    (`create_log_folder`: made for the log when it does not exist yet); exceptions of `usage_errors` types (a
    bad setting found after parsing) exit 2, those of an `exit_codes` type their own status, any other
    exception 1. SystemExit (argparse) passes through."""
    try:
        return body() or 0
    except BrokenPipeError:  # the reader of our output went away (`| head`): nothing is wrong with the run
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        report("error: interrupted")
        return INTERRUPTED
    except Exception as e:
        where = write_log(tool, e, log_folder, create_log_folder)
        report(f"error: {error_line(e, usage_errors)} (traceback: {where})")
        special = [code for kind, code in (exit_codes or {}).items() if isinstance(e, kind)]
        return special[0] if special else USAGE if isinstance(e, usage_errors) else FAILED


# ---------------------------------------------------------------------------------------------------
# Console scripts.

Commands = dict[str, tuple[str, str]]  # name -> (module with main(argv), one line of help)

SHARD_TOOLS: Commands = {
    "pack": ("shard_tools.pack", "pack a manifest (CSV, TSV, Parquet, YFCC100M, a folder) into a shard set"),
    "index": ("shard_tools.index", "make existing WebDataset tars a shard set (.idx files + index.json)"),
    "verify": ("shard_tools.verify", "check a shard set against its index.json (sizes, checksums, .idx)"),
    "crawl": ("shard_tools.crawl", "download the images of a URL manifest with img2dataset into a shard set"),
    "generate": ("shard_tools.generate", "diffusion-generated images (made here or ingested) as a shard set"),
    "manifest": ("shard_tools.manifest", "list a folder of images as a manifest CSV"),
    "synth": ("shard_tools.synth", "render a labeled procedural image set and its manifest"),
    "dedup": ("shard_tools.dedup", "near-duplicates within shard sets and leakage into downstream sets (pHash)"),
}


def package_version() -> str:
    """The installed stream-ssl's version; when it is not installed (run from a checkout), pyproject.toml's."""
    import importlib.metadata
    import re

    try:
        return importlib.metadata.version("stream-ssl")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    except OSError:
        return "unknown"
    found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return found.group(1) if found else "unknown"


def usage(prog: str, summary: str, commands: Commands) -> str:
    width = max(map(len, commands))
    lines = [f"usage: {prog} COMMAND [ARGS ...] | --version | --help", "", summary, "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in commands.items()]
    lines += ["", f"`{prog} COMMAND --help` explains the options of one command; `{prog} --version` prints the "
                  "version."]
    return "\n".join(lines) + "\n"


def dispatch(prog: str, summary: str, commands: Commands, argv: list[str] | None = None) -> int:
    """Run `prog COMMAND ARGS...`: the command's module's main(ARGS)."""
    global _invoked_as
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(usage(prog, summary, commands))
        return 0 if argv else USAGE
    if argv[0] in ("-V", "--version"):
        print(f"{prog} {package_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        sys.stderr.write(f"{prog}: unknown command {name!r}; choose one of {', '.join(commands)}\n")
        return USAGE
    main = importlib.import_module(commands[name][0]).main
    _invoked_as = f"{prog} {name}"
    try:
        return main(rest) or 0
    finally:
        _invoked_as = None


def main(argv: list[str] | None = None) -> int:
    """`shard-tools COMMAND ...`."""
    return dispatch("shard-tools", "Shard tools: manifests and image folders -> shard sets (WebDataset tars, "
                                   ".idx files, index.json).", SHARD_TOOLS, argv)


if __name__ == "__main__":
    sys.exit(main())
