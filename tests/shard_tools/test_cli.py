"""What every command shares: one size and count rule, `--storage-options` as inline JSON or a file, one-line
errors with the traceback in a log, the installed console scripts and the scripts run by path."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import shard_tools.cli
import shard_tools.crawl
import shard_tools.generate
import shard_tools.index
import shard_tools.pack
import shard_tools.verify
import stream_ssl.cli
import stream_ssl.evaluate
import stream_ssl.plan
import stream_ssl.train
from shard_tools.cli import FAILED, SHARD_TOOLS, USAGE, log_path, run_main
from shard_tools.errors import ToolError
from shard_tools.pack import default_out
from shard_tools.quantities import parse_bytes, parse_count
from shard_tools.shardset import load_shard_set
from shard_tools.storage import parse_storage_options
from stream_ssl.cli import COMMANDS as STREAM_SSL_COMMANDS
from stream_ssl.config import parse_config
from stream_ssl.data.plan import make_plan
from tests.helpers import PYTHON, REPO

BIN = Path(PYTHON).parent
OPTIONS = {"s3": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}, "https": {"headers": {"a": "b"}}}


class _Recorder:
    """Stands in for a library function: records its arguments, returns `result`."""

    def __init__(self, result=None):
        self.result, self.args, self.kwargs = result, None, None

    def __call__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


SUMMARY = SimpleNamespace(summary=lambda out="": f"done at {out}")
INDEX = {"num_samples": 0, "shards": [], "indexed": {"reused_idx": 0, "scanned": 0, "left_out": []}}
# (module, library function main() calls, its result, main's arguments, where the storage options arrive)
TOOLS = [
    (shard_tools.pack, "pack", SUMMARY, ["m.csv", "--out", "o"], "kwargs"),
    (shard_tools.index, "index_folder", INDEX, ["d"], 6),
    (shard_tools.verify, "verify", True, ["d"], 3),
    (shard_tools.crawl, "crawl", SUMMARY, ["urls.csv", "--out", "o"], "kwargs"),
    (shard_tools.generate, "ingest", SUMMARY, ["--from-folder", "f", "--prompts", "p.csv", "--out", "o"], "kwargs"),
    (stream_ssl.plan, "load_sets", ValueError("stop here"), ["--data", "d", "--unique-samples", "1",
                                                              "--budget-samples", "1"], 1),
    (stream_ssl.evaluate, "evaluate", ValueError("stop here"), ["--checkpoint", "r", "--train", "a", "--test", "b"],
     "kwargs"),
]


@pytest.mark.parametrize("module, function, result, args, where", TOOLS, ids=[t[0].__name__ for t in TOOLS])
def test_storage_options_from_a_json_file_in_every_tool(tmp_path, monkeypatch, module, function, result, args, where):
    path = tmp_path / "storage.json"
    path.write_text(json.dumps(OPTIONS))
    for given in (str(path), json.dumps(OPTIONS)):
        fake = _Recorder(result)
        monkeypatch.setattr(module, function, fake)
        module.main([*args, "--storage-options", given])
        got = fake.kwargs["storage_options"] if where == "kwargs" else fake.args[where]
        assert got == OPTIONS
    with pytest.raises(SystemExit) as exc:  # a usage error, as argparse reports them
        module.main([*args, "--storage-options", str(tmp_path / "missing.json")])
    assert exc.value.code == USAGE


def test_storage_options_from_a_json_file_in_train(tmp_path):
    path = tmp_path / "storage.json"
    path.write_text(json.dumps(OPTIONS))
    cfg = parse_config(["--data", "d", "--storage-options", str(path)])
    assert stream_ssl.run.parse_storage_options is parse_storage_options  # what train() calls on the setting
    assert parse_storage_options(cfg.storage_options) == OPTIONS
    assert cfg.to_dict()["storage_options"] == str(path)  # config.json keeps the path, never the file's contents


def test_one_size_rule_in_every_tool(monkeypatch, make_shard_set):
    """`1G` is 10^9 bytes for pack --shard-bytes and train --cache-size, as `1G` samples is 10^9 for the plan,
    and the sizes the plan prints read back as the same number of bytes."""
    fake = _Recorder(SUMMARY)
    monkeypatch.setattr(shard_tools.pack, "pack", fake)
    shard_tools.pack.main(["m.csv", "--out", "o", "--shard-bytes", "1G", "--shard-size", "2K"])
    assert fake.kwargs["shard_bytes"] == 10**9 and fake.kwargs["shard_size"] == 2000
    cfg = parse_config(["--data", "d", "--cache-size", "1G", "--budget-samples", "1G"])
    assert stream_ssl.run.parse_bytes is parse_bytes and parse_bytes(cfg.cache_size) == 10**9
    assert parse_count(cfg.budget_samples) == 10**9 == parse_bytes("1GB") and parse_bytes("1GiB") == 2**30
    plan = make_plan([load_shard_set(str(make_shard_set(200, shard_size=50)))], 100, 400, batch_size=10)
    printed = re.search(r"cache for repeats: ~([\d.]+ \w+)", plan.describe()).group(1)
    assert abs(parse_bytes(printed.replace(" ", "")) - plan.summary()["cache_needed_bytes"]) < 0.001 * 10**6


def test_pack_writes_to_shards_slash_the_manifest_name_by_default(tmp_path):
    (tmp_path / "images").mkdir()
    assert default_out("pool.csv") == str(Path("shards/pool"))
    assert default_out("data/pool.csv.gz") == default_out("s3://b/lists/pool.tsv") == str(Path("shards/pool"))
    assert default_out(str(tmp_path / "images")) == str(Path("shards/images"))


# ---------------------------------------------------------------------------------------------------
# run_main: one line on stderr, the traceback in a log.


def test_library_errors_are_ordinary_exceptions():
    err = ToolError("no usable rows")
    assert isinstance(err, Exception) and not isinstance(err, SystemExit) and str(err) == "no usable rows"


def _fail(exc: BaseException):
    def body():
        raise exc

    return body


def test_a_failed_run_is_one_line_and_a_log_in_the_output_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert run_main("pack", _fail(ToolError("12 of 100 rows failed")), log_folder=out) == FAILED
    [line] = capsys.readouterr().err.splitlines()
    log = out / ".logs" / "pack.log"
    assert line == f"error: 12 of 100 rows failed (traceback: {log})"
    assert "Traceback (most recent call last)" in log.read_text() and "ToolError: 12 of 100 rows failed" in \
        log.read_text()
    # No output folder yet: the log goes to the user's own log folder, and no output folder is made for it.
    assert log_path("pack", tmp_path / "never") == log_path("pack") and not (tmp_path / "never").exists()
    assert run_main("pack", _fail(KeyError("x")), log_folder=tmp_path / "never") == FAILED
    assert capsys.readouterr().err.startswith("error: KeyError: 'x' (traceback: ")
    # ... unless the command says its folder is made for the log (a training run: docs/training.md)
    assert run_main("train", _fail(KeyError("x")), log_folder=tmp_path / "run", create_log_folder=True) == FAILED
    assert f"(traceback: {tmp_path / 'run' / '.logs' / 'train.log'})" in capsys.readouterr().err


def test_logs_without_an_output_folder_are_private_to_the_user(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert run_main("crawl", _fail(KeyError("x"))) == FAILED
    log = tmp_path / "state" / "stream-ssl" / "logs" / "crawl.log"
    assert f"(traceback: {log})" in capsys.readouterr().err and "KeyError" in log.read_text()
    assert (log.parent.stat().st_mode & 0o777) == 0o700
    # a home that cannot be written: a folder of the user's own in the temp folder, never a shared file name
    monkeypatch.setenv("XDG_STATE_HOME", "/proc/no-such-home")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert log_path("crawl") == tmp_path / "tmp" / f"stream-ssl-{os.getuid()}" / "crawl.log"
    assert (log_path("crawl").parent.stat().st_mode & 0o777) == 0o700
    # a link planted where that folder goes is refused, and nothing is written through it
    shutil.rmtree(tmp_path / "tmp" / f"stream-ssl-{os.getuid()}")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    os.symlink(tmp_path / "elsewhere", tmp_path / "tmp" / f"stream-ssl-{os.getuid()}")
    assert run_main("crawl", _fail(KeyError("x"))) == FAILED
    assert "no log written" in capsys.readouterr().err and not list((tmp_path / "elsewhere").iterdir())


def test_usage_errors_exit_2_and_credentials_stay_out(tmp_path, capsys):
    secret = ValueError("bad --data https://user:pw@host/set?X-Amz-Signature=SIG; options {'secret': 'S3CR3T'}")
    assert run_main("plan", _fail(secret), log_folder=tmp_path, usage_errors=(ValueError,)) == USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: bad --data https://host/set options") and len(err.splitlines()) == 1
    text = err + (tmp_path / ".logs" / "plan.log").read_text()
    assert not any(s in text for s in ("pw@", "SIG", "S3CR3T"))
    assert run_main("plan", _fail(ValueError("two\nlines")), log_folder=tmp_path, usage_errors=(ValueError,)) == 2
    assert capsys.readouterr().err.startswith("error: two ... (traceback: ")


def test_interrupts_and_exits_pass_as_they_are(capsys):
    assert run_main("x", _fail(KeyboardInterrupt())) == 130 and capsys.readouterr().err == "error: interrupted\n"
    with pytest.raises(SystemExit):
        run_main("x", _fail(SystemExit(2)))
    assert run_main("x", lambda: None) == 0 and run_main("x", lambda: 3) == 3


# ---------------------------------------------------------------------------------------------------
# Installed console scripts and scripts run by path (subprocesses).


def _run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.multiprocess
def test_console_scripts(tmp_path, make_shard_set):
    for name in ("shard-tools", "stream-ssl"):
        assert (BIN / name).exists(), f"{BIN / name} missing: install the project (pip install -e .)"
    for cmd, words in ((["shard-tools", "--help"], ["pack", "index", "verify", "crawl", "generate", "manifest",
                                                     "synth"]),
                       (["stream-ssl", "--help"], ["train", "plan", "evaluate", "sweep"]),
                       (["shard-tools", "pack", "--help"], ["usage: shard-tools pack", "K, M, G, T are powers"]),
                       (["stream-ssl", "plan", "--help"], ["usage: stream-ssl plan", "--storage-options"])):
        proc = _run([BIN / cmd[0], *cmd[1:]], tmp_path)
        text = " ".join(proc.stdout.split())
        assert proc.returncode == 0 and all(w in text for w in words), proc.stdout + proc.stderr
    assert _run([BIN / "stream-ssl", "nope"], tmp_path).returncode == USAGE
    manifest = make_shard_set(40, shard_size=20).parent / "images" / "manifest.csv"
    proc = _run([BIN / "shard-tools", "pack", manifest, "--shard-size", "20"], tmp_path)
    assert proc.returncode == 0 and f"at {Path('shards/manifest')}" in proc.stdout, proc.stderr
    proc = _run([BIN / "stream-ssl", "plan", "--data", "shards/manifest", "--unique-samples", "50%",
                 "--budget-samples", "0.1K", "--batch-size", "10", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["unique_samples"] == 20 and json.loads(proc.stdout)["steps"] == 10


@pytest.mark.multiprocess
def test_pack_a_manifest_verbatim_from_anywhere(tmp_path, make_shard_set):
    """`python shard_tools/pack.py manifest.csv` from another folder: shards/manifest there, and it says so."""
    manifest = make_shard_set(40, shard_size=20).parent / "images" / "manifest.csv"
    proc = _run([PYTHON, REPO / "shard_tools" / "pack.py", manifest], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("packed 40 of 40 rows into 1 shard (") and f"at {Path('shards/manifest')}" in \
        proc.stdout
    assert load_shard_set(str(tmp_path / "shards" / "manifest")).num_samples == 40
    proc = _run([PYTHON, REPO / "shard_tools" / "pack.py", tmp_path / "missing.csv"], tmp_path)
    [line] = proc.stderr.splitlines()
    assert proc.returncode == FAILED and line.startswith("error: manifest ") and "does not exist" in line


SCRIPTS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "shard_tools").glob("*.py")
                 if "def main(" in p.read_text() and p.name != "cli.py")
SCRIPTS += ["launch/sweep.py", "launch/demo.py", "launch/demo_s3.py", "launch/nodes.py", "stream_ssl/train.py"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_command_runs_as_a_script(tmp_path, script):
    """Run by path from another folder: the script's own folder first on sys.path must not shadow a module (no
    file in launch/ is named like the `launch` package, so none of them edits sys.path)."""
    proc = _run([PYTHON, REPO / script, "--help"], tmp_path)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------
# --help and --version of every command.

COMMANDS = {**SHARD_TOOLS, **STREAM_SSL_COMMANDS}  # name -> (module, summary)


class _Built(Exception):
    pass


def _parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a command's main() builds, caught when it starts parsing (nothing runs)."""
    built = []

    def catch(self, args=None, namespace=None):
        built.append(self)
        raise _Built

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Built):
        importlib.import_module(module).main([])
    return built[0]


def _has_default(action: argparse.Action) -> bool:
    """A default worth telling: not None, False or empty (0 and True are)."""
    value = action.default
    if value is None or value is False or value is argparse.SUPPRESS:
        return False
    return not (isinstance(value, (str, list, tuple, dict)) and not value)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_says_what_it_does_and_its_default_once(command, monkeypatch):
    """Every option has help text; an option with a default (not None, False or empty) names it, once; the
    examples use the installed commands."""
    parser = _parser_of(COMMANDS[command][0], monkeypatch)
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        text = formatter._expand_help(action) if action.help else ""
        defaults = len(re.findall(r"\bdefault\b", text, re.IGNORECASE))
        if not text.strip():
            problems.append(f"{name}: no help")
        elif action.option_strings and not action.required and _has_default(action) and not defaults:
            problems.append(f"{name}: default {action.default!r} not shown")
        elif defaults > 1:
            problems.append(f"{name}: the default shown {defaults} times: {text}")
    assert problems == []
    old = re.findall(r"python (?:-m )?(?:stream_ssl|shard_tools|launch)[./]\w+", parser.description or "")
    assert old == [], "examples should use the installed commands (stream-ssl ..., shard-tools ...)"


@pytest.mark.parametrize("main, prog", [(shard_tools.cli.main, "shard-tools"), (stream_ssl.cli.main, "stream-ssl")])
def test_version_of_both_commands(main, prog, capsys, monkeypatch):
    pyproject = re.search(r'(?m)^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"{prog} {importlib.metadata.version('stream-ssl')}\n"

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)  # run from a checkout
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"{prog} {pyproject}\n"
    assert main(["--help"]) == 0 and "--version" in capsys.readouterr().out
