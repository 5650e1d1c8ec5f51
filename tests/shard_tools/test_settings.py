"""Settings declared once (shard_tools/settings.py): one dataclass field per option gives the library keyword, the
flag, the `--config` file key and the digest of pack, crawl and generate; files are checked as flags are, and the
digests of existing outputs did not change, so shard sets packed before still resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import PIL
import pytest
import yaml

import shard_tools.generate as gen
import stream_ssl.config
from shard_tools import settings
from shard_tools.crawl import CrawlCommand, CrawlSettings, _plan_job, _resolved
from shard_tools.generate import GenerateCommand, prompts_from_classes
from shard_tools.manifest import read_manifest
from shard_tools.pack import PackCommand, PackSettings, Part, pack
from shard_tools.settings import configure, load_settings, parse_settings, settings_parser
from tests.helpers.packing import jpeg_bytes

COMMANDS = [PackCommand, CrawlCommand, GenerateCommand]


def parse(cls, argv):
    return parse_settings(settings_parser(cls, "tool", None), cls, [str(a) for a in argv])


def test_a_file_gives_settings_and_flags_override_it(tmp_path):
    path = tmp_path / "pack.yaml"
    path.write_text("shard_size: 2K\nseed: 7\nmax_error_rate: 0\ndedup: true\npart: 2/3\nstorage_options: {anon: true}"
                    "\nlabel_column: ''\nout: shards/pool\n")
    c = parse(PackCommand, ["m.csv", "--config", path, "--seed", "9", "--no-dedup"])
    assert (c.manifest, c.out, c.shard_size, c.seed, c.dedup, c.part) == ("m.csv", "shards/pool", 2000, 9, False,
                                                                          Part(2, 3))
    assert c.max_error_rate == 0.0 and isinstance(c.max_error_rate, float)  # YAML's 0 read as the number it is
    assert c.storage_options == {"anon": True} and c.label_column == ""
    assert c.workers == PackSettings().workers  # neither file nor flag: the default
    json_file = tmp_path / "crawl.json"  # JSON is YAML: the same reader
    json_file.write_text(json.dumps({"manifest": "urls.csv", "out": "o", "img2dataset_options": {"compute_hash": "md5"},
                                     "max_image_area": 1e6}))
    c = parse(CrawlCommand, ["--config", json_file, "--no-exif", "--img2dataset-option", "a=1",
                             "--img2dataset-option", "b=x"])
    assert (c.manifest, c.out, c.extract_exif, c.max_image_area) == ("urls.csv", "o", False, 1e6)
    assert c.img2dataset_options == {"a": 1, "b": "x"}  # the flags replace the file's mapping
    named = tmp_path / "named.yaml"  # keys named like the options where a field's name differs
    named.write_text("exif: false\n")
    assert parse(CrawlCommand, ["urls.csv", "--out", "o", "--config", named]).extract_exif is False
    named.write_text("format: png\nout: o\n")
    assert parse(GenerateCommand, ["--config", named]).image_format == "png"


@pytest.mark.parametrize("text, message", [
    ("shard_size: lots\n", "shard_size: cannot read 'lots'"),
    ("seed: fast\n", "seed must be an integer, got 'fast'"),
    ("dedup: maybe\n", "dedup must be true or false, got 'maybe'"),
    ("format: xls\n", "format 'xls' is not one of csv, tsv, parquet, yfcc, folder"),
    ("part: 4/3\n", "part: --part 4/3: K/N needs 1 <= K <= N"),
    ("sharde_size: 5\n", "unknown settings ['sharde_size']"),
    ("- shard_size\n", "expected a mapping of settings"),
])
def test_a_bad_file_is_a_usage_error_naming_the_file_and_the_setting(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        parse(PackCommand, ["m.csv", "--config", path])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{path}: {message}" in err, err


def test_a_flag_wins_over_a_bad_file_value_and_names_itself(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: fast\n")
    assert parse(PackCommand, ["m.csv", "--config", path, "--seed", "4"]).seed == 4  # the file's value is not read
    with pytest.raises(SystemExit):
        parse(PackCommand, ["m.csv", "--config", path, "--seed", "slow"])
    assert "--seed: invalid literal for int()" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(CrawlCommand, ["urls.csv"])  # required: on the command line or in the file
    assert "--out is required (on the command line or in --config)" in capsys.readouterr().err


@pytest.mark.parametrize("cls", COMMANDS, ids=[c.__name__ for c in COMMANDS])
def test_a_file_of_the_defaults_reads_back_as_the_defaults(tmp_path, cls):
    """Every setting of every tool is a file key and a flag; what a file says is what the settings hold."""
    required = {f.name: "x" for f in dataclasses.fields(cls) if f.metadata["required"]}
    defaults = cls(**required)
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(defaults)))
    assert parse(cls, ["--config", path]) == defaults
    help_text = settings_parser(cls, "tool", None).format_help()
    flags = [f.metadata["flag"] or "--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)
             if not f.metadata["positional"]]
    assert "--config FILE" in help_text and [f for f in flags if f not in help_text] == []


def test_library_calls_take_the_settings_or_keywords(tmp_path):
    with pytest.raises(TypeError, match="unknown setting sharde_size"):
        pack(tmp_path / "m.csv", tmp_path / "out", sharde_size=4)
    path = tmp_path / "pack.yaml"
    path.write_text("shard_size: 1K\nname: pool\n")
    s = load_settings(PackSettings, path, seed=3)
    assert (s.shard_size, s.name, s.seed) == (1000, "pool", 3)
    command = PackCommand(manifest="m.csv", shard_size=5, merge=True)
    assert configure(PackSettings, command, {"seed": 2}) == PackSettings(shard_size=5, seed=2, progress=None)
    assert stream_ssl.config.setting is settings.setting  # the trainer declares its settings the same way


# ---------------------------------------------------------------------------------------------------
# The digests that tell an output from another are those of the hand-written settings before (computed with
# that code): an interrupted run of an older version resumes, a finished one is not packed again.

MANIFEST = "path,label,caption,id\na.jpg,cat,hello,1\nb.jpg,,,2\nc.jpg,dog,x,3\n"


def test_pack_digest_is_unchanged(tmp_path):
    for i, name in enumerate("abc"):
        (tmp_path / f"{name}.jpg").write_bytes(jpeg_bytes(seed=i))
    manifest = tmp_path / "m.csv"
    manifest.write_text(MANIFEST)
    r = pack(manifest, tmp_path / "out", name="pool", seed=3, shard_size=7, shard_bytes=10**6,
             caption_column="caption", key_column="id", max_pixels=1000, decode=True)
    assert r.index["packing"]["config_sha256"] == "8eef2535a05ab68c97f6da5ff988101d54a78351ff64f620b42b0310222e72cc"
    r = pack(manifest, tmp_path / "o2", path_column="path", label_column="", source="downstream", max_side=64,
             quality=80, workers=2, threads=3, root_dir=tmp_path, part=Part(1, 2))
    assert r.index["settings"] == {
        "caption_column": None, "decode": False, "dedup": False, "encoder": PIL.__version__, "format": "csv",
        "key_column": None, "label_column": None,
        "manifest_sha256": "49763b7d22f46b4c7a44fa8ec683716d7432b0df2f4beaf29e861504c0013540",
        "max_pixels": 100000000, "max_side": 64, "name": "o2", "pack_version": 3, "path_column": "path",
        "quality": 80, "root": str(tmp_path), "seed": 0, "shard_bytes": None, "shard_size": 1000,
        "source": "downstream"}


def test_crawl_digest_is_unchanged(tmp_path):
    manifest = tmp_path / "urls.csv"
    manifest.write_text("url,caption,label\nhttp://h/a.jpg,one,cat\nhttp://h/b.jpg,two,dog\n/local.jpg,x,cat\n")
    expected = [({}, "712bbafb20549751e7c527cfb99cd107f84d212e51e673b5927829aac651b501"),
                (dict(seed=4, shard_size=2, image_size=32, resize_mode="border", max_image_area=1e6,
                      user_agent_token="tok", img2dataset_options={"compute_hash": "md5"}, encode_format="png",
                      extract_exif=False, caption_column="caption"),
                 "9e225cd1a86dcfa88c2b6106fecc387729ebeaef7aa87045fb5cfaa8954a3df9")]
    for options, digest in expected:
        s = CrawlSettings(**options)
        m = read_manifest(manifest, s.format, s.url_column, s.label_column, s.caption_column, s.key_column)
        assert _plan_job(m, manifest, _resolved(s, m, "cout"), "1.47.0").digest == digest


def test_generate_and_ingest_digests_are_unchanged(tmp_path, monkeypatch):
    digests = []

    def written(out, name, config, *args, **kwargs):
        digests.append(hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest())

    monkeypatch.setattr(gen, "_write_set", written)
    prompts = prompts_from_classes(["dog", "cat"], ["a {name}"])
    for options in ({}, dict(per_prompt=3, seed=2, steps=5, guidance=None, width=16, height=24, negative_prompt="blur",
                             image_format="png", quality=50, shard_size=9, batch_size=7)):
        gen.generate(tmp_path / "g", prompts, "models/tiny", pipeline=object(), label_names=["dog", "cat"], **options)
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"x" * 10)
    (folder / "b.png").write_bytes(b"y" * 3)
    (tmp_path / "p.csv").write_text("file,prompt,class\na.png,a dog,dog\nb.png,a cat,cat\n")
    for options in ({}, dict(seed=3, shard_size=5, max_pixels=1000, max_error_rate=0.5)):
        gen.ingest(folder, tmp_path / "p.csv", tmp_path / "i", **options)
    assert digests == ["46ec9aa6b51b59e2db22de334219576295958410b71f1f5f0a9b89e713320a8e",
                       "ec15a097af8e29ef0d441767e3bd4357d9e6cb0ae2925be5016168bbd9c32d23",
                       "4f2bea8a617d945b47d2e4d81d131134421ff23deab61bcc5a8d1332a0728f04",
                       "1061709fb2492f01a7a6ef20dc5bee81a44f43f122be7297c19a8275b2dd9d60"]
