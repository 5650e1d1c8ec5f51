"""What every command shares: one-line errors with the traceback in a log, and the console scripts.

`run_main` runs a command's body: a library error becomes one line `error: REASON (traceback: LOG)` on stderr
and an exit status (1: the run failed; 2: bad usage, as argparse exits), and the traceback, redacted, goes
to a log: `OUT/.logs/TOOL.log` when the command has a local output folder that exists, else
`stream-ssl-TOOL.log` in the system temp folder. Library functions raise ordinary exceptions (ToolError and
its subclasses, ValueError, OSError, ...), so a program calling them catches them with `except Exception`.

`dispatch` is the console scripts' entry: `shard-tools pack ...` runs `shard_tools.pack.main([...])` with the
rest of the command line, as `python shard_tools/pack.py ...` does.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from shard_tools.errors import ToolError
from shard_tools.storage import is_url, redact

FAILED, USAGE, DIVERGED, INTERRUPTED = 1, 2, 3, 130  # DIVERGED: a training run whose loss stopped being finite
_invoked_as: str | None = None  # "shard-tools pack" while `dispatch` runs a command


def tool_prog(default: str) -> str:
    """The program name a command's --help shows: `shard-tools pack` under the console script, else `default`."""
    return _invoked_as or default


def progress_switch(p: argparse.ArgumentParser, default: bool | None = None) -> None:
    """`--progress/--no-progress`; the default None shows the bar when stderr is a terminal."""
    when = {None: "on a terminal", True: "on", False: "off"}[default]
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=default,
                   help=f"show a progress bar on stderr (default: {when})")


def log_path(tool: str, folder: str | Path | None = None) -> Path:
    """Where `tool` writes a failure's traceback: FOLDER/.logs/TOOL.log when `folder` is a local folder that
    exists (a failed run does not create its output folder), else stream-ssl-TOOL.log in the temp folder."""
    if folder is not None and not is_url(str(folder)) and Path(folder).is_dir():
        return Path(folder) / ".logs" / f"{tool}.log"
    return Path(tempfile.gettempdir()) / f"stream-ssl-{tool}.log"


def write_log(tool: str, error: BaseException, folder: str | Path | None = None) -> str:
    """Append the redacted traceback of `error` to the tool's log; returns where it went (or why not)."""
    text = redact("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    header = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {tool} (pid {os.getpid()}) failed\n"
    reason = "no log written"
    for path in dict.fromkeys((log_path(tool, folder), log_path(tool))):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
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


def run_main(tool: str, body: Callable[[], int | None], log_folder: str | Path | None = None,
             usage_errors: tuple[type[BaseException], ...] = (),
             exit_codes: dict[type[BaseException], int] | None = None) -> int:
    """Run `body()` (the command after its arguments are parsed) and return the exit status.

    `tool` names the log (`pack` -> pack.log); `log_folder` is the command's output folder, if it has one;
    exceptions of `usage_errors` types (a bad setting found after parsing) exit 2, those of an `exit_codes`
    type their own status, any other exception 1. SystemExit (argparse) passes through."""
    try:
        return body() or 0
    except BrokenPipeError:  # the reader of our output went away (`| head`): nothing is wrong with the run
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        where = write_log(tool, e, log_folder)
        print(f"error: {error_line(e, usage_errors)} (traceback: {where})", file=sys.stderr)
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


def usage(prog: str, summary: str, commands: Commands) -> str:
    width = max(map(len, commands))
    lines = [f"usage: {prog} COMMAND [ARGS ...]", "", summary, "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in commands.items()]
    lines += ["", f"`{prog} COMMAND --help` explains the options of one command."]
    return "\n".join(lines) + "\n"


def dispatch(prog: str, summary: str, commands: Commands, argv: list[str] | None = None) -> int:
    """Run `prog COMMAND ARGS...`: the command's module's main(ARGS)."""
    global _invoked_as
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(usage(prog, summary, commands))
        return 0 if argv else USAGE
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
