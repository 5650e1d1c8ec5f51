"""Settings declared once: one dataclass field per option drives a function's keywords, the command line, YAML or
JSON files of settings and the digest that tells one output from another.

    @dataclass
    class PackSettings:
        shard_size: int = setting(1000, f"samples per shard, {COUNT_HELP}", parse=count_arg, digest=True)

`settings_parser` makes the flags (`--shard-size`; booleans as `--x/--no-x` switches; choices checked at parse
time; every help text ends with its default) and `--config FILE`. `parse_settings` layers them, lowest
first: the defaults, the file (keys are the field names, or the options' names: `shard_size: 2K`), then the
flags. A value from a file is read as its flag's text would be (`parse`) and checked against the field's type
and choices; an error names the file and the setting. `digest_of` gives the settings marked `digest` (those
that shape the bytes a tool writes), and `configure` builds the settings of a library call from keyword
arguments.

Used by the shard tools (pack, crawl, generate) and the trainer (stream_ssl/config.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

S = TypeVar("S")
NULL_WORDS = ("none", "null", "")  # a flag's text that means None for a setting that may be None (not text)
_TYPES = {"bool": bool, "int": int, "float": float, "dict": dict, "list": list, "str": str}
_TELLS_DEFAULT = re.compile(r"\bdefault\b", re.IGNORECASE)
_NAMED = {"bool": "true or false", "int": "an integer", "float": "a number", "dict": "a mapping", "list": "a list"}


def setting(default, help: str, choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None, *,
            parse: Callable[[str], Any] | None = None, digest: bool | str = False, flag: str | None = None,
            metavar: str | None = None, group: str | None = None, positional: bool = False, append: bool = False,
            required: bool = False, **more):
    """A settings field with its `--help` text and, where the value is one of a few names, its `choices` (a tuple,
    or a function giving them when they come from a registry).

    parse: reads a flag's text (and a scalar from a file) as the value (count_arg: `2K` -> 2000); without it,
        the field's type does (int, float, a YAML mapping for dict). digest: the setting shapes the output's
        bytes (True, or the name it has in the digest). flag, metavar, group: the option's name (default
        --field-name), the placeholder in `--help`, the `--help` section. positional: an optional positional
        argument. append: a repeatable flag, collected into the list (or, with pairs, the mapping). required: the
        command needs it, on the command line or in the file. `more`: other metadata the tool reads itself.
    """
    meta = {"help": help, "choices": choices, "parse": parse, "digest": digest, "flag": flag, "metavar": metavar,
            "group": group, "positional": positional, "append": append, "required": required, **more}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def kind(f: dataclasses.Field) -> str:
    """The field's base type name: 'bool', 'int', 'float', 'str', 'dict', 'list' (or a class name: 'Part')."""
    return re.match(r"\w+", str(f.type)).group()


def nullable(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The allowed values of a setting (computed for those that come from a registry)."""
    allowed = f.metadata.get("choices")
    return tuple(allowed()) if callable(allowed) else allowed


def flag_of(f: dataclasses.Field) -> str:
    """How the command line names the setting: `--shard-size` (or its positional name)."""
    if f.metadata.get("positional"):
        return f.name
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def progress_setting(default: bool | None):
    """The `progress` setting of a tool: a bar on stderr; None shows it when stderr is a terminal (the command
    line's default; a library call's is off)."""
    return setting(default, "show a progress bar on stderr" + (" (default: on a terminal)" if default is None else ""))


def text_or_none(text: str) -> str | None:
    """`parse` for a text setting where none, null or nothing means None."""
    return None if text.strip().lower() in NULL_WORDS else text


# ---------------------------------------------------------------------------------------------------
# Values: from a flag's text, from a file, checked.


def text_value(f: dataclasses.Field, text: str):
    """A flag's text as the setting's value, for settings without `parse`."""
    name = kind(f)
    if nullable(f) and name != "str" and text.strip().lower() in NULL_WORDS:
        return None
    if name == "dict":
        value = yaml.safe_load(text)  # JSON is YAML; YAML flow style ({temperature: 0.2}) works too
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping like '{{\"temperature\": 0.2}}', got {text!r}")
        return value
    if name == "int":
        return int(text)
    if name == "float":
        return float(text)
    return text


def check_value(f: dataclasses.Field, value, where: str):
    """`value` of setting `f` with the YAML quirks undone (1e-6 read as text, 1 as an integer); raises ValueError
    naming `where` and the setting when it has the wrong type or is not one of the choices."""
    name = kind(f)
    if value is None:
        if not nullable(f):
            raise ValueError(f"{where}: {f.name} may not be null")
        return None
    if name == "float" and not isinstance(value, bool):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {f.name} must be a number, got {value!r}") from None
    wanted = _TYPES.get(name, object)
    if not isinstance(value, wanted) or (name in ("int", "float") and isinstance(value, bool)):
        raise ValueError(f"{where}: {f.name} must be {_NAMED.get(name, name)}, got {value!r}")
    allowed = choices_of(f)
    if allowed and value not in allowed:
        raise ValueError(f"{where}: {f.name} {value!r} is not one of {', '.join(allowed)}")
    return value


def file_value(f: dataclasses.Field, value, where: str):
    """A value from a settings file (or a recipe): a scalar of a setting with `parse` is read as its flag's text
    would be (`shard_size: 2K`), then checked."""
    parse = f.metadata.get("parse")
    if parse is not None and isinstance(value, (str, int, float)):
        try:
            value = parse(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"{where}: {f.name}: {e}") from None
    return check_value(f, value, where)


def read_mapping(cls: type, path: str | Path) -> dict:
    """The raw settings of a YAML or JSON file for `cls`, by field name; a key may also be the option's name with
    underscores where the two differ (`exif` for extract_exif). Not a mapping, or an unknown key, is an error."""
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    names = {flag_of(f).lstrip("-").replace("-", "_"): f.name for f in dataclasses.fields(cls)}
    names.update({f.name: f.name for f in dataclasses.fields(cls)})
    unknown = set(loaded) - set(names)
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown, key=str)}")
    return {names[k]: v for k, v in loaded.items()}


def load_settings(cls: type[S], path: str | Path, **options) -> S:
    """The settings in a YAML or JSON file, checked (for a library call: pack(m, out, load_settings(...)))."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: file_value(fields[k], v, str(path)) for k, v in read_mapping(cls, path).items()}
    return cls(**{**values, **options})


# ---------------------------------------------------------------------------------------------------
# The command line.


def shown(value) -> str:
    """A default as `--help` shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value) if isinstance(value, str) else str(value)


def help_of(f: dataclasses.Field, default) -> str:
    """The help text with the default at its end, unless the text tells it (names its default), there is none
    (None: the setting is not used unless given), or the setting is required or positional."""
    text = f.metadata["help"]
    told = default is None or _TELLS_DEFAULT.search(text)
    if not (told or f.metadata.get("required") or f.metadata.get("positional")):
        text += f" (default: {shown(default)})"
    return text.replace("%", "%%")


def add_settings(p: argparse.ArgumentParser, cls: type) -> None:
    """A flag for every field of `cls` (a positional argument where the field says so), in its `--help` group.
    Every flag's default is None, so that what was not given can come from a file or the field's default."""
    defaults, groups = cls(), {}
    for f in dataclasses.fields(cls):
        title = f.metadata.get("group")
        if title and title not in groups:
            groups[title] = p.add_argument_group(title)
        into = groups[title] if title else p
        text, parse, allowed = help_of(f, getattr(defaults, f.name)), f.metadata.get("parse"), choices_of(f)
        if f.metadata.get("positional"):
            into.add_argument(f.name, nargs="?", default=None, type=parse, help=text)
        elif kind(f) == "bool":
            into.add_argument(flag_of(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                              help=text)
        else:
            metavar = f.metadata.get("metavar") or (None if allowed else f.name.upper())
            into.add_argument(flag_of(f), dest=f.name, default=None, type=parse, choices=allowed, metavar=metavar,
                              action="append" if f.metadata.get("append") else "store", help=text)


def settings_parser(cls: type, prog: str, description: str | None,
                    example: str = "shard_size: 2K") -> argparse.ArgumentParser:
    """A tool's command line: `--config FILE` and the flags of every setting of `cls`."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_option(p, example)
    add_settings(p, cls)
    return p


def add_config_option(p: argparse.ArgumentParser, example: str) -> None:
    """`--config FILE`: the settings in a YAML or JSON file, whose keys are the options' names with underscores."""
    p.add_argument("--config", type=Path, metavar="FILE",
                   help=f"YAML or JSON file of settings named like the options ({example}); flags given here "
                        "override it")


def flag_value(f: dataclasses.Field, raw):
    """The value of a flag as argparse left it: converted by `parse` already, or text; repeated ones collected."""
    if f.metadata.get("append"):
        items = raw if f.metadata.get("parse") else [text_value(f, text) for text in raw]
        return dict(items) if kind(f) == "dict" else list(items)
    if f.metadata.get("parse") is not None or isinstance(raw, bool):
        return raw
    return text_value(f, raw)


def given_values(p: argparse.ArgumentParser, cls: type, args: argparse.Namespace) -> dict:
    """The settings a file (`--config`) and the flags give, flags first; a bad value is a usage error naming the
    file and the setting, or the flag. A value the flags replace is not read from the file."""
    from_file: dict = {}
    if args.config:
        try:
            from_file = read_mapping(cls, args.config)
        except (OSError, ValueError, yaml.YAMLError) as e:
            p.error(str(e))
    values, fields = {}, {f.name: f for f in dataclasses.fields(cls)}
    for f in fields.values():
        raw = getattr(args, f.name)
        if raw is not None:
            try:
                values[f.name] = flag_value(f, raw)
            except (ValueError, yaml.YAMLError) as e:
                p.error(f"{flag_of(f)}: {e}")
    try:
        values.update({k: file_value(fields[k], v, str(args.config)) for k, v in from_file.items() if k not in values})
    except ValueError as e:
        p.error(str(e))
    return values


def check_required(p: argparse.ArgumentParser, cls: type, values: dict) -> None:
    """A usage error naming the required settings that neither the file nor the flags give."""
    missing = [flag_of(f) for f in dataclasses.fields(cls) if f.metadata.get("required") and
               values.get(f.name) in (None, "")]
    if missing:
        p.error(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (on the command line or in "
                "--config)")


def parse_settings(p: argparse.ArgumentParser, cls: type[S], argv: list[str] | None = None) -> S:
    """The settings of a command line made by `settings_parser`: defaults < `--config` file < flags."""
    values = given_values(p, cls, p.parse_args(argv))
    check_required(p, cls, values)
    return cls(**values)


# ---------------------------------------------------------------------------------------------------
# Library calls and digests.


def configure(cls: type[S], settings=None, options: dict | None = None) -> S:
    """The settings of a library call: those of `settings` (a `cls`, or any settings object with its fields, such
    as a command's), with `options` (keyword arguments named like the fields) put in. An unknown name is a
    TypeError, as an unknown keyword argument is."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options or {}) - names)
    if unknown:
        raise TypeError(f"unknown {'setting' if len(unknown) == 1 else 'settings'} {', '.join(unknown)} (the "
                        f"settings are the fields of {cls.__name__})")
    base = {} if settings is None else {n: getattr(settings, n) for n in names}
    return cls(**{**base, **(options or {})})


def options_of(settings, cls: type) -> dict:
    """The fields of `cls` in `settings` (a command's settings), as keyword arguments of the library call."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)}


def digest_of(settings) -> dict:
    """The settings that shape the bytes a tool writes (declared with `digest`), by their names in the digest;
    paths as text."""
    out = {}
    for f in dataclasses.fields(settings):
        key = f.metadata.get("digest")
        if key:
            value = getattr(settings, f.name)
            out[f.name if key is True else key] = os.fspath(value) if isinstance(value, os.PathLike) else value
    return out


def config_sha256(config: dict) -> str:
    """The digest of an output's settings: a folder holding another digest holds another output."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def check_choices(settings, error: type[Exception] = ValueError) -> None:
    """Raise `error` naming the flag when a setting of a library call is not one of its choices (the command line
    and files are checked as they are read)."""
    for f in dataclasses.fields(settings):
        allowed, value = choices_of(f), getattr(settings, f.name)
        if allowed and value is not None and value not in allowed:
            raise error(f"{flag_of(f)} {value!r}: use one of {', '.join(allowed)}")
