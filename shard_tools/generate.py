"""Diffusion-generated images as a shard set (source=generated): made here from a local model, or ingested.

    shard-tools generate --model models/sd15 --classes-file classes.txt --template "a photo of a {name}" \\
        --per-prompt 100 --out shards/generated --size 512 --steps 25 --batch-size 16
    shard-tools generate --model models/sd15 --prompts prompts.csv --per-prompt 10 --out shards/gen
    shard-tools generate --from-folder made_elsewhere/ --prompts prompts.csv --out shards/gen

Prompts come from class names and templates (every template for every class; `{name}` is the class name,
label k is line k of --classes-file or the k-th name of --classes), or from a prompts file: `.txt` (one prompt
a line), `.csv`/`.tsv` (header row), `.jsonl` or `.parquet` with a `prompt` column and optionally a `class`
column (class names, mapped to ids in sorted order, or integer labels). Every prompt gets --per-prompt
images. Image j of prompt p is drawn from its own seed, a pure function of (--seed, p, j), recorded in the
sample's json; the latent noise comes from a CPU generator, so an image does not depend on the batch it
was made in nor on the device (up to floating-point differences between devices and batch sizes).

The model is a diffusers pipeline folder on this machine (what `save_pretrained` writes: model_index.json
plus component folders), loaded with `local_files_only=True`: this tool never downloads anything. Images
are made in batches on the GPU when there is one (fp16 there, fp32 on CPU) and written to shards as they
come. Each sample holds `KEY.jpg` (or --format), `KEY.json` (source, prompt, class, label, seed, prompt
and image index, model, steps, guidance, size) and `KEY.cls` when prompts carry classes. The work is
shuffled (seeded) before it starts, so any prefix of shards is a uniform random subset of all prompts.

--from-folder DIR --prompts FILE ingests images generated elsewhere: FILE (CSV/TSV/JSONL/Parquet) has a
`file` column (image path relative to DIR), a `prompt` column, and optionally `class` and `seed`; other
columns are kept in the json. Images keep their bytes; unreadable, missing or damaged files are skipped and
listed in `OUT/NAME-errors.csv` (the run fails past --max-error-rate).

Resuming: complete shards are recorded in `OUT/.NAME-gen/`; running the same command again continues
after the last complete shard, and a finished set is left as it is. A re-run with settings that change
the images (model, prompts, seed, steps, size, ...) stops with a message; --overwrite starts over.
`diffusers` (and `transformers` for text encoders) are optional dependencies: pip install diffusers
transformers. Ingestion needs neither.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import io
import json
import os
import string
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shard_tools.cli import run_main, tool_prog
from shard_tools.errors import (
    ShardSetTotals,
    ToolError,
    count_by_kind,
    positive_int,
    read_errors,
    remove_partial_shards,
    shard_set_name,
    write_errors,
)
from shard_tools.images import MAX_PIXELS, ImageError, check_image
from shard_tools.manifest import label_ids
from shard_tools.outputs import Output, open_output
from shard_tools.quantities import COUNT_HELP, count_arg
from shard_tools.settings import (
    check_choices,
    config_sha256,
    configure,
    digest_of,
    options_of,
    parse_settings,
    progress_setting,
    setting,
    settings_parser,
)
from shard_tools.shardset import ShardInfo, idx_name, shard_name, shards_intact
from shard_tools.storage import STORAGE_OPTIONS_HELP, storage_options_arg
from shard_tools.writer import ShardWriter, make_index, write_index

__all__ = ["DEFAULT_TEMPLATE", "GenerateCommand", "GenerateError", "GenerateResult", "GenerateSettings",
           "IngestSettings", "Prompt", "generate", "image_seed", "ingest", "load_pipeline", "main", "model_folder",
           "prompts_from_classes", "read_class_names", "read_prompts"]

SOURCE = "generated"
GEN_VERSION = 1  # bump when the bytes written for the same inputs change
DEFAULT_TEMPLATE = "a photo of a {name}"
PROMPT_COLUMNS = ("prompt", "text", "caption")
CLASS_COLUMNS = ("class", "label", "class_name", "name")
FILE_COLUMNS = ("file", "path", "image", "file_name", "filename")
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


PROMPTS, GENERATION, INGESTION = "prompts", "generation", "ingestion"


@dataclass
class _SetSettings:
    """What generate() and ingest() share: the shard set and how it is written."""

    name: str | None = setting(None, "shard name prefix (default: the output folder's name)")
    seed: int = setting(0, "seed of the per-image seeds and of the shuffle", digest=True)
    shard_size: int = setting(1000, f"samples per shard, {COUNT_HELP}", parse=count_arg, digest=True)
    overwrite: bool = setting(False, "delete an earlier set in --out and start over")
    storage_options: dict | None = setting(None, STORAGE_OPTIONS_HELP, parse=storage_options_arg)
    progress: bool | None = progress_setting(False)


@dataclass
class GenerateSettings(_SetSettings):
    """What generate() takes besides the output, the prompts and the model: one field per option of the command
    line (the same name, with dashes, --format for image_format). `digest` marks what shapes the images."""

    per_prompt: int = setting(1, f"images per prompt, {COUNT_HELP}", parse=count_arg, group=GENERATION, digest=True)
    steps: int = setting(30, "inference steps", parse=positive_int, group=GENERATION, digest=True)
    guidance: float | None = setting(7.5, "classifier-free guidance scale", group=GENERATION, digest=True)
    width: int | None = setting(None, "image width (default: --size, else the model's)", parse=positive_int,
                                group=GENERATION, digest=True)
    height: int | None = setting(None, "image height (default: --size, else the model's)", parse=positive_int,
                                 group=GENERATION, digest=True)
    negative_prompt: str | None = setting(None, "what the images should not show, for pipelines that take one",
                                          group=GENERATION, digest=True)
    batch_size: int = setting(4, "images per pipeline call", parse=positive_int, group=GENERATION)
    device: str = setting("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...", group=GENERATION)
    dtype: str = setting("auto", "auto: fp16 on GPU, fp32 on CPU", ("auto", "fp32", "fp16", "bf16"), group=GENERATION)
    image_format: str = setting("jpg", "image encoding", tuple(IMAGE_FORMATS), flag="--format", group=GENERATION,
                                digest="format")
    quality: int = setting(95, "JPEG/WebP quality", group=GENERATION, digest=True)


@dataclass
class IngestSettings(_SetSettings):
    """What ingest() takes besides the folder, the prompts file and the output."""

    max_pixels: int = setting(MAX_PIXELS, f"refuse larger images as possible decompression bombs, {COUNT_HELP}",
                              parse=count_arg, group=INGESTION, digest=True)
    max_error_rate: float = setting(0.05, "fail past this fraction of bad rows", group=INGESTION)


@dataclass
class _Where:
    """Where generate.py writes and what it reads (first in its `--help`)."""

    out: str | None = setting(None, "output folder of the shard set, or an fsspec URL", required=True)
    classes: str | None = setting(None, "comma-separated class names (label k = the k-th name)", group=PROMPTS)
    classes_file: str | None = setting(None, "class names, one a line (label k = line k)", group=PROMPTS)
    template: list[str] | None = setting(None, f"prompt template with {{name}}, repeatable (default "
                                               f"{DEFAULT_TEMPLATE!r})", append=True, group=PROMPTS)
    prompts: str | None = setting(None, "prompts file (.txt, .csv, .tsv, .jsonl, .parquet): prompt[, class][, file, "
                                        "seed]", group=PROMPTS)
    model: str | None = setting(None, "local folder of a diffusers pipeline (never downloaded)", group=GENERATION)
    size: int | None = setting(None, "image width and height (default: the model's)", parse=positive_int,
                               group=GENERATION)
    from_folder: str | None = setting(None, "ingest the images in this folder listed in --prompts (file column)",
                                      group=INGESTION)


@dataclass
class GenerateCommand(IngestSettings, GenerateSettings, _Where):
    """The command line of generate.py: what it reads and writes, GenerateSettings and IngestSettings."""

    progress: bool | None = progress_setting(None)


class GenerateError(ToolError):
    """Generation or ingestion failed as a whole."""


@dataclass(frozen=True)
class Prompt:
    text: str
    label: int | None = None
    name: str | None = None  # class name
    row: int | None = None  # line (or row) in the prompts file
    file: str | None = None  # ingestion: the image, relative to the folder
    seed: int | None = None  # ingestion: the seed it was made with, when known
    meta: str | None = None  # extra json fields (compact JSON object)

    def extra(self) -> dict:
        return json.loads(self.meta) if self.meta else {}


@dataclass
class GenerateResult(ShardSetTotals):
    index: dict
    jobs: int = 0  # images asked for (generation) or rows (ingestion)
    written: int = 0  # samples in the shard set
    made: int = 0  # images generated or ingested by this run
    skipped: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_shards: int = 0
    already_complete: bool = False

    def summary(self, out: str = "") -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        line = (f"wrote {self.written} of {self.jobs} images into {self.shards} shards ({self.bytes / 1e6:.1f} MB)"
                f"{' at ' + out if out else ''} in {self.seconds:.1f}s ({self.made} made by this run); skipped "
                f"{sum(self.skipped.values())}: {skipped}")
        if self.resumed_shards:
            line += f"; resumed after {self.resumed_shards} complete shards"
        if self.already_complete:
            line += " (already complete: nothing rewritten)"
        return line


# ---------------------------------------------------------------------------------------------------
# Prompts.


def read_class_names(path: str | Path) -> list[str]:
    """Class names, one a line (blank lines and lines starting with '#' skipped); line k names label k."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GenerateError(f"cannot read class names from {path}: {e}") from None
    names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not names:
        raise GenerateError(f"{path} holds no class names")
    return names


def prompts_from_classes(names: list[str], templates: list[str] | None = None) -> list[Prompt]:
    """Every template for every class, class by class; `{name}` is the class name, label k the k-th name."""
    templates = templates or [DEFAULT_TEMPLATE]
    for t in templates:
        fields = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
        if fields != {"name"}:
            raise GenerateError(f"--template {t!r}: use the field {{name}} (and no other), got {sorted(fields)}")
    if len(set(names)) != len(names):
        raise GenerateError("class names must be distinct")
    return [Prompt(t.format(name=n), label, n, meta=json.dumps({"template": t}))
            for label, n in enumerate(names) for t in templates]


def _records(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line or row number, record) of a CSV/TSV/JSONL/Parquet/TXT prompts file, and its columns."""
    low = path.name.lower()
    try:
        if low.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return [(i + 1, r) for i, r in enumerate(table.to_pylist())], list(table.column_names)
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise GenerateError(f"cannot read prompts file {path}: {e}") from None
    except Exception as e:  # pyarrow's errors
        raise GenerateError(f"cannot read prompts file {path}: {e}") from None
    if low.endswith((".jsonl", ".json")):
        out, columns = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise GenerateError(f"{path}:{n}: not a JSON object ({e})") from None
            if not isinstance(rec, dict):
                raise GenerateError(f"{path}:{n}: expected a JSON object")
            columns += [k for k in rec if k not in columns]
            out.append((n, rec))
        return out, columns
    if low.endswith((".csv", ".tsv", ".tab")):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if not low.endswith(".csv") else ",")
        rows = [(reader.line_num, dict(r)) for r in reader]
        return rows, [c.strip() for c in reader.fieldnames or []]
    return [(n, {"prompt": ln}) for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()], ["prompt"]


def _pick(columns: list[str], names: tuple[str, ...]) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def read_prompts(path: str | Path, need_file: bool = False) -> tuple[list[Prompt], list[str]]:
    """The prompts of a prompts file and the class names (sorted; empty when labels are integers or absent).

    Columns: prompt (or text, caption); optional class (or label, class_name, name); for ingestion
    (`need_file`) file (or path, image, file_name) and optionally seed. Other columns go to the json."""
    path = Path(path)
    records, columns = _records(path)
    if not records:
        raise GenerateError(f"prompts file {path} holds no prompts")
    pcol, ccol, fcol = _pick(columns, PROMPT_COLUMNS), _pick(columns, CLASS_COLUMNS), _pick(columns, FILE_COLUMNS)
    scol = _pick(columns, ("seed",))
    if pcol is None:
        raise GenerateError(f"{path}: no prompt column (one of {', '.join(PROMPT_COLUMNS)}); columns are {columns}")
    if need_file and fcol is None:
        raise GenerateError(f"{path}: --from-folder needs a column naming each image ({', '.join(FILE_COLUMNS)}); "
                            f"columns are {columns}")
    used = {pcol, ccol, fcol, scol} - {None}
    classes = [str(r.get(ccol, "") if r.get(ccol) is not None else "").strip() for _, r in records] if ccol else []
    ids, names = label_ids(classes) if ccol else ({}, [])
    prompts = []
    for i, (n, r) in enumerate(records):
        text = str(r.get(pcol) or "").strip()
        if not text:
            raise GenerateError(f"{path}:{n}: empty prompt")
        label = name = None
        if ccol:
            if not classes[i]:
                raise GenerateError(f"{path}:{n}: empty {ccol}")
            label = ids[classes[i]]
            name = classes[i] if names else None
        file = seed = None
        if need_file:
            file = str(r.get(fcol) or "").strip()
            if not file:
                raise GenerateError(f"{path}:{n}: empty {fcol}")
        if scol and str(r.get(scol) if r.get(scol) is not None else "").strip():
            try:
                seed = int(str(r[scol]).strip())
            except ValueError:
                raise GenerateError(f"{path}:{n}: seed {r[scol]!r} is not an integer") from None
        extra = {k: v for k, v in r.items() if k not in used and v not in (None, "")}
        prompts.append(Prompt(text, label, name, n, file, seed, json.dumps(extra, sort_keys=True) if extra else None))
    return prompts, names


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image `image_index` of prompt `prompt_index`: 63 bits from numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


# ---------------------------------------------------------------------------------------------------
# Shards, resume records and the index.


def _state_dir(name: str) -> str:
    return f".{name}-gen"


@dataclass
class _Resume:
    shards: list[ShardInfo] = field(default_factory=list)
    next: int = 0
    written: int = 0
    errors: list[tuple[int, str, str]] = field(default_factory=list)


def _load_resume(output: Output, name: str) -> _Resume:
    """The complete shards of an interrupted run (whose checksums still match). The config was checked before."""
    r = _Resume()
    state = _state_dir(name)
    present = set(output.list(state))
    k = 0
    while f"{k:06d}.json" in present:
        try:
            st = json.loads(output.read_bytes(f"{state}/{k:06d}.json") or b"")
            info = ShardInfo(**st["shard"])
        except (ValueError, TypeError, KeyError):
            break
        idx = output.read_bytes(idx_name(info.path))
        if info.path != shard_name(name, k) or idx is None or hashlib.sha256(idx).hexdigest() != st.get("idx_sha256"):
            break
        if output.sha256(info.path) != (info.sha256, info.bytes):
            break
        r.shards.append(info)
        r.next, r.written = int(st["next"]), int(st["written"])
        r.errors.extend((int(a), str(b), str(c)) for a, b, c in st.get("errors", []))
        k += 1
    for stale in present - {f"{i:06d}.json" for i in range(k)} - {"config.json"}:
        output.remove(f"{state}/{stale}")
    return r


def _wipe(output: Output, name: str) -> None:
    remove_partial_shards(output, name, keep=0)
    for entry in ("index.json", f"{name}-errors.csv"):
        output.remove(entry)
    output.remove(_state_dir(name))


def _index_config(index: dict) -> str | None:
    return (index.get("generation") or {}).get("config_sha256")


def _changed(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


# An outcome of one job: (row, where, fields) for a sample, or (row, where, None, reason) to skip it.
Outcome = tuple


def _write_set(out: str, name: str, config: dict, jobs: int, produce: Callable[[int], Iterator[Outcome]],
               s: _SetSettings, index_meta: dict, desc: str, max_error_rate: float | None = None) -> GenerateResult:
    """Run `produce(position)` (the outcomes of jobs position, position + 1, ... in order) into shards, resumably."""
    start = time.perf_counter()
    digest = config_sha256(config)
    output = open_output(out, s.storage_options)
    try:
        output.lock(f"generate.py --name {name}")
        if s.overwrite:
            _wipe(output, name)
        done = _claim(output, out, name, config, digest)
        if done is not None:
            errors = read_errors(output, name)
            return GenerateResult(done, jobs, done["num_samples"], 0, count_by_kind(errors), errors,
                                  time.perf_counter() - start, len(done["shards"]), True)
        resume = _load_resume(output, name)
        remove_partial_shards(output, name, keep=len(resume.shards))
        run = _Run(output, name, jobs, None if max_error_rate is None else max_error_rate * jobs, list(resume.errors),
                   resume.next, resume.written)
        run.writer = ShardWriter(output, name, s.shard_size, shards=resume.shards, on_shard=run.save_state)
        _write_jobs(run, produce(run.position), s.progress, desc, max_error_rate)
        write_errors(output, name, run.errors, column="file")
        if run.written == 0:
            raise GenerateError(f"no images were written; see {output.location(f'{name}-errors.csv')}")
        remove_partial_shards(output, name, keep=len(run.writer.shards))
        index = make_index(name, run.writer.shards, **index_meta, skipped=count_by_kind(run.errors),
                           generation={**config, "config_sha256": digest})
        write_index(output, index)
        output.remove(_state_dir(name))
        return GenerateResult(index, jobs, run.written, run.made, count_by_kind(run.errors), sorted(run.errors),
                              time.perf_counter() - start, len(resume.shards))
    finally:
        output.close()


def _claim(output: Output, out: str, name: str, config: dict, digest: str) -> dict | None:
    """The index of a finished set with the same settings whose shards are intact (nothing to do), else None
    once the folder is ready for this run: its settings recorded, an unfinished run with them kept."""
    state = _state_dir(name)
    old_index = output.read_bytes("index.json")
    saved = output.read_bytes(f"{state}/config.json")
    previous = json.loads(saved) if saved else None
    if old_index and previous is None:
        try:
            index = json.loads(old_index)
        except ValueError:
            index = {}
        if _index_config(index) == digest:
            if shards_intact(output, index):
                return index
            _wipe(output, name)  # same settings, damaged shards: make it again
        elif isinstance(index.get("generation"), dict):
            changed = _changed({k: v for k, v in index["generation"].items() if k != "config_sha256"}, config)
            raise GenerateError(f"{out} holds a set made with other settings (changed: {', '.join(changed)}); "
                                "use another --out, or --overwrite to start over")
        else:
            raise GenerateError(f"{out} holds a shard set that generate.py did not make; use another --out, or "
                                "--overwrite to replace it")
    if previous is not None and previous.get("config_sha256") != digest:
        changed = _changed(previous.get("config", {}), config)
        raise GenerateError(f"{out} holds an unfinished run with other settings (changed: {', '.join(changed)}); "
                            "use the same settings to continue it, another --out, or --overwrite to start over")
    output.remove("index.json")
    if previous is None:
        output.write_bytes(f"{state}/config.json", json.dumps({"config_sha256": digest, "config": config},
                                                              indent=1).encode())
    return None


@dataclass
class _Run:
    """A generation or ingestion in progress: the next job, what was written and skipped since the start."""

    output: Output
    name: str
    jobs: int
    limit: float | None  # errors allowed (--max-error-rate x jobs); None: no limit
    errors: list[tuple[int, str, str]]
    position: int  # the next job
    written: int  # samples in the set
    made: int = 0  # samples made by this run
    span: list = field(default_factory=list)  # errors since the last published shard
    writer: ShardWriter | None = None

    def save_state(self, info: ShardInfo, idx_text: str) -> None:
        """The resume record of a published shard (the writer calls it)."""
        record = {"shard": vars(info), "idx_sha256": hashlib.sha256(idx_text.encode()).hexdigest(),
                  "next": self.position, "written": self.written, "errors": self.span}
        self.output.write_bytes(f"{_state_dir(self.name)}/{len(self.writer.shards) - 1:06d}.json",
                                json.dumps(record).encode())
        self.span = []


def _write_jobs(run: _Run, stream: Iterator[Outcome], progress: bool | None, desc: str,
                max_error_rate: float | None) -> None:
    """Write every outcome of `stream` (a sample, or a job to skip) in order; shards publish as they fill."""
    width = max(9, len(str(run.jobs - 1)))
    bar = tqdm(total=run.jobs, initial=run.position, unit="img", file=sys.stderr, mininterval=0.5,
               disable=None if progress is None else not progress, desc=desc)
    try:
        for outcome in stream:
            row, where, fields = outcome[:3]
            run.position += 1
            bar.update(1)
            if fields is None:
                run.errors.append((row, where, outcome[3]))
                run.span.append((row, where, outcome[3]))
                if run.limit is not None and len(run.errors) > run.limit:
                    write_errors(run.output, run.name, run.errors, column="file")
                    raise GenerateError(f"more than {max_error_rate:.1%} of {run.jobs} rows failed "
                                        f"(--max-error-rate); see {run.output.location(f'{run.name}-errors.csv')}")
                continue
            key = f"{run.written:0{width}d}"
            run.written += 1
            run.made += 1
            run.writer.add(key, fields)  # publishes the shard when it is full (save_state records it)
        run.writer.flush()
    finally:
        if hasattr(stream, "close"):
            stream.close()
        bar.close()
        run.writer.abort()


def _label_fields(p: Prompt, label_names: list[str] | None) -> dict:
    if p.label is None:
        return {}
    name = p.name if p.name is not None else (label_names[p.label] if label_names and p.label < len(label_names)
                                              else None)
    meta = {"label": p.label}
    if name is not None:
        meta["class"] = name
        meta["label_name"] = name
    return meta


def _prompts_digest(prompts: list[Prompt], label_names: list[str] | None) -> str:
    text = json.dumps([[p.text, p.label, p.name, p.file, p.seed, p.meta] for p in prompts] + [label_names or []])
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Generation.


def _model_digest(folder: Path) -> str:
    """The model's identity: its config/tokenizer files' contents and its weight files' names and sizes."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        rel = p.relative_to(folder).as_posix()
        if p.suffix in (".json", ".txt", ".model", ".yaml"):
            h.update(f"{rel}\0".encode() + p.read_bytes() + b"\0")
        else:
            h.update(f"{rel}\0{p.stat().st_size}\0".encode())
    return h.hexdigest()


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def model_folder(model: str | Path) -> Path:
    folder = Path(model)
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        raise GenerateError(f"--model {model}: not a local diffusers pipeline folder (model_index.json missing); "
                            "generate.py never downloads: save the pipeline with save_pretrained() first")
    return folder


def load_pipeline(model: str | Path, device: str = "auto", dtype: str = "auto"):
    """A diffusers pipeline from the local folder `model` (never downloads), on `device`, progress bars off."""
    folder = model_folder(model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from diffusers import DiffusionPipeline
    except ImportError as e:
        raise GenerateError(f"generating needs diffusers (and transformers for text encoders): pip install diffusers "
                            f"transformers ({e})") from None
    device = pick_device(device)
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    try:
        from diffusers.utils import deprecation_utils

        dtype_key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"  # renamed in 0.3x
    except ImportError:
        dtype_key = "torch_dtype"
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **{dtype_key: torch_dtype})
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError, ... for a bad folder
        raise GenerateError(f"cannot load a diffusers pipeline from {folder}: {type(e).__name__}: {e}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encode(image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg" and image.mode != "RGB":
        image = image.convert("RGB")
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format=IMAGE_FORMATS[fmt], quality=quality)
    return buf.getvalue()


def generate(out: str | Path, prompts: list[Prompt], model: str | Path | None = None,
             settings: GenerateSettings | None = None, *, label_names: list[str] | None = None, pipeline=None,
             **options) -> GenerateResult:
    """Generate `per_prompt` images for every prompt with the diffusers pipeline in the folder `model` (or an
    already loaded `pipeline`, with `model` still naming it) into the shard set `out`, with `settings` and keyword
    `options` named like its fields (generate(out, prompts, model, per_prompt=10, steps=25)). See the module doc."""
    s = configure(GenerateSettings, settings, options)
    if model is None:
        raise GenerateError("--model: give the folder of a diffusers pipeline")
    if not prompts:
        raise GenerateError("no prompts")
    check_choices(s, GenerateError)
    if s.per_prompt < 1 or s.batch_size < 1 or s.shard_size < 1 or s.steps < 1:
        raise GenerateError("--per-prompt, --batch-size, --shard-size and --steps must be >= 1")
    name = shard_set_name(str(out), s.name, GenerateError)
    folder = model_folder(model) if pipeline is None else Path(model)
    jobs = len(prompts) * s.per_prompt
    config = {
        "generate_version": GEN_VERSION, "mode": "diffusers", "model": folder.name,
        "model_sha256": _model_digest(folder) if folder.is_dir() else str(model),
        "prompts_sha256": _prompts_digest(prompts, label_names), "prompts": len(prompts),
        **digest_of(s), "quality": s.quality if s.image_format != "png" else None,
    }
    maker = _Diffusion(prompts, label_names, folder, pipeline, s, np.random.default_rng(s.seed).permutation(jobs))
    return _write_set(str(out), name, config, jobs, maker.outcomes, s, _index_meta(prompts, label_names, s.seed, jobs),
                      f"generating {name}")


def _index_meta(prompts: list[Prompt], label_names: list[str] | None, seed: int, rows: int, **more) -> dict:
    """What index.json says of a generated set beyond its shards."""
    labeled = any(p.label is not None for p in prompts)
    return {"source": SOURCE, "seed": seed, "fields": ["image", "json", *(["cls"] if labeled else [])],
            "labels": {"column": "class" if labeled else None, "names": list(label_names or [])}, "rows": rows,
            **more}


def _fields(pr: Prompt, ext: str, data: bytes, meta: dict) -> dict[str, bytes]:
    """A sample's members: the image, KEY.cls when the prompt has a class, and KEY.json: `meta` plus the
    prompt's extra fields."""
    for key, value in pr.extra().items():
        meta.setdefault(key, value)
    fields = {ext: data}
    if pr.label is not None:
        fields["cls"] = str(pr.label).encode()
    fields["json"] = json.dumps(meta, sort_keys=True).encode()
    return fields


@dataclass
class _Diffusion:
    """How `generate` makes its images: the prompts, the job order (shuffled), the pipeline and its settings.
    Job j is image j % per_prompt of prompt j // per_prompt."""

    prompts: list[Prompt]
    label_names: list[str] | None
    folder: Path
    pipeline: object  # an already loaded pipeline, or None to load the one in `folder`
    s: GenerateSettings
    order: np.ndarray

    def outcomes(self, position: int) -> Iterator[Outcome]:
        """The outcomes of jobs position, position + 1, ... in the shuffled order, made batch by batch."""
        if position >= len(self.order):
            return
        pipe = self.pipeline if self.pipeline is not None else load_pipeline(self.folder, self.s.device, self.s.dtype)
        params = inspect.signature(pipe.__call__).parameters
        if "prompt" not in params:
            raise GenerateError(f"the pipeline in {self.folder} ({type(pipe).__name__}) takes no text prompt")
        fixed = {"num_inference_steps": self.s.steps, "guidance_scale": self.s.guidance, "height": self.s.height,
                 "width": self.s.width, "output_type": "pil"}
        kwargs = {k: v for k, v in fixed.items() if k in params and v is not None}
        for q in range(position, len(self.order), self.s.batch_size):
            batch = [divmod(int(j), self.s.per_prompt) for j in self.order[q:q + self.s.batch_size]]
            seeds = [image_seed(self.s.seed, p, k) for p, k in batch]
            result = self._call(pipe, params, kwargs, batch, seeds)
            images = result.images if hasattr(result, "images") else result[0]
            flags = getattr(result, "nsfw_content_detected", None) or [False] * len(images)
            for (p, k), s, image, flagged in zip(batch, seeds, images, flags):
                if flagged:
                    yield (p, f"prompt {p} image {k}", None, "nsfw (flagged by the pipeline's safety checker)")
                else:
                    yield (p, f"prompt {p} image {k}", self._sample(p, k, s, image, "guidance_scale" in kwargs))

    def _call(self, pipe, params, kwargs: dict, batch: list[tuple[int, int]], seeds: list[int]):
        """One pipeline call; each image's latent noise from its own CPU generator."""
        import torch

        call = dict(kwargs, prompt=[self.prompts[p].text for p, _ in batch],
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])
        if self.s.negative_prompt is not None and "negative_prompt" in params:
            call["negative_prompt"] = [self.s.negative_prompt] * len(batch)
        try:
            with torch.inference_mode():
                return pipe(**call)
        except torch.cuda.OutOfMemoryError:
            raise GenerateError(f"out of GPU memory with --batch-size {self.s.batch_size}: lower it (finished shards "
                                "are kept; run again to continue)") from None

    def _sample(self, p: int, k: int, seed: int, image, guided: bool) -> dict[str, bytes]:
        pr = self.prompts[p]
        meta = {"source": SOURCE, "prompt": pr.text, "seed": seed, "prompt_index": p, "image_index": k,
                "model": self.folder.name, "steps": self.s.steps, "width": image.width, "height": image.height,
                **_label_fields(pr, self.label_names)}
        if self.s.guidance is not None and guided:
            meta["guidance"] = self.s.guidance
        if self.s.negative_prompt is not None:
            meta["negative_prompt"] = self.s.negative_prompt
        return _fields(pr, self.s.image_format, _encode(image, self.s.image_format, self.s.quality), meta)


# ---------------------------------------------------------------------------------------------------
# Ingestion of images generated elsewhere.


def ingest(folder: str | Path, prompts_file: str | Path, out: str | Path, settings: IngestSettings | None = None,
           **options) -> GenerateResult:
    """Pack the images under `folder` listed in `prompts_file` (file, prompt, class, seed) as a generated set, with
    `settings` and keyword `options` named like its fields (ingest(folder, prompts, out, shard_size=500))."""
    s, folder = configure(IngestSettings, settings, options), Path(folder)
    if not folder.is_dir():
        raise GenerateError(f"--from-folder {folder}: not a folder")
    if s.shard_size < 1:
        raise GenerateError("--shard-size must be >= 1")
    if not 0 <= s.max_error_rate <= 1:
        raise GenerateError("--max-error-rate must be in 0..1")
    name = shard_set_name(str(out), s.name, GenerateError)
    prompts, label_names = read_prompts(prompts_file, need_file=True)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    config = {
        "generate_version": GEN_VERSION,
        "mode": "ingest",
        "prompts_sha256": _prompts_digest(prompts, label_names),
        "files_sha256": hashlib.sha256("\0".join(f"{f}:{(folder / f).stat().st_size}" for f in files).encode())
        .hexdigest(),
        **digest_of(s),
    }
    order = np.random.default_rng(s.seed).permutation(len(prompts))
    meta = _index_meta(prompts, label_names, s.seed, len(prompts), from_folder=str(folder),
                       prompts_file=str(prompts_file))
    return _write_set(str(out), name, config, len(prompts),
                      lambda position: _ingested(folder, prompts, label_names, order, position, s.max_pixels),
                      s, meta, f"ingesting {name}", s.max_error_rate)


def _ingested(folder: Path, prompts: list[Prompt], label_names: list[str], order: np.ndarray, position: int,
              max_pixels: int) -> Iterator[Outcome]:
    """The outcomes of the listed images from `position` on, in the shuffled order."""
    for q in range(position, len(prompts)):
        pr = prompts[int(order[q])]
        path = Path(pr.file) if os.path.isabs(pr.file) else folder / pr.file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            yield (pr.row, pr.file, None, "missing file")
            continue
        except OSError as e:
            yield (pr.row, pr.file, None, f"unreadable file ({e.strerror or e})")
            continue
        try:
            c = check_image(data, max_pixels)
        except ImageError as e:
            yield (pr.row, pr.file, None, str(e))
            continue
        meta = {"source": SOURCE, "prompt": pr.text, "file": pr.file, "row": pr.row, "width": c.width,
                "height": c.height, **_label_fields(pr, label_names)}
        if pr.seed is not None:
            meta["seed"] = pr.seed
        yield (pr.row, pr.file, _fields(pr, c.ext, c.data, meta))


# ---------------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str] | None = None) -> int:
    p = settings_parser(GenerateCommand, tool_prog("generate.py"), __doc__)
    c = parse_settings(p, GenerateCommand, argv)
    if c.from_folder:
        if not c.prompts:
            p.error("--from-folder needs --prompts FILE (file, prompt[, class, seed])")
        if c.model or c.classes or c.classes_file or c.template:
            p.error("--from-folder takes --prompts only (no --model, --classes, --classes-file or --template)")
        return run_main("generate", lambda: _ingest(c), log_folder=c.out)
    if not c.model:
        p.error("give --model PATH (a local diffusers pipeline folder), or --from-folder DIR to ingest images")
    sources = [bool(c.prompts), bool(c.classes or c.classes_file)]
    if sum(sources) != 1 or (c.classes and c.classes_file):
        p.error("give one of --prompts FILE, --classes NAMES or --classes-file FILE")
    if c.template and c.prompts:
        p.error("--template goes with --classes/--classes-file, not --prompts")
    return run_main("generate", lambda: _generate(c), log_folder=c.out)


def _ingest(c: GenerateCommand) -> int:
    r = ingest(c.from_folder, c.prompts, c.out, **options_of(c, IngestSettings))
    print(r.summary(c.out))
    return 0


def _generate(c: GenerateCommand) -> int:
    if c.prompts:
        prompts, names = read_prompts(c.prompts)
    else:
        names = read_class_names(c.classes_file) if c.classes_file else [n.strip() for n in c.classes.split(",")
                                                                          if n.strip()]
        prompts = prompts_from_classes(names, c.template)
    options = {**options_of(c, GenerateSettings), "width": c.width or c.size, "height": c.height or c.size}
    r = generate(c.out, prompts, c.model, label_names=names, **options)
    print(r.summary(c.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
