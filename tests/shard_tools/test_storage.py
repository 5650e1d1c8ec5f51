"""The one storage layer (shard_tools/storage.py): storage options, per-process clients, error classes,
whole-file reads with retries, and shard sets read through it (local and over HTTP on loopback)."""

from __future__ import annotations

import json
import multiprocessing
import shutil

import fsspec
import pytest

from shard_tools import storage
from shard_tools.shardset import load_shard_set
from shard_tools.storage import (
    BucketNotFound,
    StorageAccessDenied,
    describe_storage_error,
    filesystem,
    http_status,
    is_not_found,
    is_transient,
    options_for,
    parse_storage_options,
    read_location,
    redact,
    storage_error,
)
from stream_ssl.testing.servers import s3_client_error
from tests.helpers.packing import http_server

OPTIONS = {"s3": {"anon": True, "client_kwargs": {"region_name": "eu-west-1"}}, "https": {"headers": {"a": "b"}}}


def test_storage_options_inline_or_from_a_file(tmp_path):
    path = tmp_path / "opts.json"
    path.write_text(json.dumps(OPTIONS))
    assert parse_storage_options(json.dumps(OPTIONS)) == parse_storage_options(str(path)) == OPTIONS
    assert parse_storage_options(OPTIONS) is OPTIONS and parse_storage_options("") == parse_storage_options(None) == {}
    with pytest.raises(ValueError, match=r"^--storage-options: 'nope.json' is neither a JSON object nor a readable"):
        parse_storage_options("nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"^--storage-options: not valid JSON in {tmp_path / 'bad.json'}"):
        parse_storage_options(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="--storage-options: expected a JSON object"):
        parse_storage_options('["a", 1]')


def test_options_for_aliases_and_the_environment(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert options_for("s3a://b/k", OPTIONS)["anon"] is True  # s3a reads the s3 entry
    pool = {"config_kwargs": {"max_pool_connections": 64}}  # (botocore's 10 would cap the reader's GETs in flight)
    assert options_for("s3://b/k", {"s3a": {"anon": True}}) == {"anon": True, **pool}  # and the other way round
    assert options_for("http://h/x", OPTIONS) == {"headers": {"a": "b"}}  # http reads https's
    assert options_for("/local/x", {"anon": True}) == {} and options_for("file:///x", OPTIONS) == {}
    assert options_for("s3://b/k", {"anon": True}) == {"anon": True, **pool}  # flat: every remote URL
    assert options_for("s3://b/k", {"config_kwargs": {"max_pool_connections": 8}})["config_kwargs"] == \
        {"max_pool_connections": 8}  # the user's setting wins
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "us-east-2")
    got = options_for("s3://b/k", OPTIONS)
    assert got["client_kwargs"] == {"region_name": "eu-west-1", "endpoint_url": "http://127.0.0.1:9"}
    env_only = options_for("s3://b/k")["client_kwargs"]
    assert env_only == {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-2"}
    assert OPTIONS["s3"]["client_kwargs"] == {"region_name": "eu-west-1"}  # the caller's options are not changed


def test_one_client_per_process_options_and_environment(monkeypatch):
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    a = filesystem("s3://b/k", {"s3": {"anon": True, "client_kwargs": {"region_name": "x", "verify": False}}})
    same = filesystem("s3://c/d", {"s3": {"client_kwargs": {"verify": False, "region_name": "x"}, "anon": True}})
    assert a is same  # the same protocol and options, written in another order
    assert filesystem("s3://b/k", {"s3": {"anon": False}}) is not a
    assert a is not fsspec.filesystem("s3", anon=True, client_kwargs={"region_name": "x", "verify": False})
    monkeypatch.setenv("AWS_PROFILE", "other")  # another identity: another client
    assert filesystem("s3://b/k", {"s3": {"anon": True, "client_kwargs": {"region_name": "x", "verify": False}}}) \
        is not a


def _child_client(conn, parent_id: int) -> None:
    conn.send(id(filesystem("memory://x/y")) == parent_id)
    conn.close()


def test_a_forked_worker_makes_its_own_client():
    fs = filesystem("memory://x/y")
    assert filesystem("memory://x/z") is fs
    parent, child = multiprocessing.get_context("fork").Pipe()
    proc = multiprocessing.get_context("fork").Process(target=_child_client, args=(child, id(fs)))
    proc.start()
    reused = parent.recv()
    proc.join(30)
    assert proc.exitcode == 0 and reused is False


def test_error_classes():
    class Status(Exception):
        def __init__(self, status):
            self.status = status

    class Botocore(Exception):
        def __init__(self, code, status):
            self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}

    class CutBody(ConnectionError):  # aiohttp's parser errors carry code=400 for a body cut short
        code = 400

    assert http_status(Status(503)) == 503 and http_status(Botocore("SlowDown", 503)) == 503
    assert http_status(ValueError()) is None and http_status(CutBody()) is None
    assert is_not_found(FileNotFoundError()) and is_not_found(Status(404)) and is_not_found(Status(410))
    assert is_not_found(Botocore("NoSuchKey", 404)) and not is_not_found(Status(403))
    assert is_transient(CutBody()) and is_transient(Botocore("SlowDown", 503)) and not is_transient(Status(404))
    assert not is_transient(Botocore("AccessDenied", 403)) and not is_transient(PermissionError())


class _Flaky:
    def __init__(self, failures: list[BaseException]):
        self.failures, self.calls = failures, 0

    def cat_file(self, path):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return b"data of " + path.encode()


def test_read_location_retries_transient_errors_only(monkeypatch, tmp_path):
    (tmp_path / "f.bin").write_bytes(b"local")
    assert read_location(str(tmp_path / "f.bin")) == read_location(f"file://{tmp_path}/f.bin") == b"local"
    flaky = _Flaky([ConnectionResetError("reset"), TimeoutError("slow")])
    monkeypatch.setattr(storage, "filesystem", lambda url, so=None: flaky)
    assert read_location("s3://b/k", retries=3, backoff=0) == b"data of b/k" and flaky.calls == 3
    flaky = _Flaky([PermissionError("denied")])
    with pytest.raises(PermissionError):
        read_location("s3://b/k", retries=3, backoff=0)
    assert flaky.calls == 1
    flaky = _Flaky([ConnectionResetError("reset")] * 3)
    with pytest.raises(ConnectionResetError):
        read_location("s3://b/k", retries=2, backoff=0)
    assert flaky.calls == 3


def test_shard_sets_and_missing_files_over_http(make_shard_set, tmp_path):
    folder = make_shard_set(60, shard_size=25)
    shutil.copytree(folder, tmp_path / "set")
    (tmp_path / "empty").mkdir()
    with http_server(tmp_path) as base:
        remote = load_shard_set(f"{base}/set", {"https": {}})  # per-protocol options: http reads https's
        local = load_shard_set(str(folder))
        assert (remote.shards, remote.num_samples, remote.labels) == (local.shards, local.num_samples, local.labels)
        assert read_location(remote.shard_url(1)) == (folder / local.shards[1].path).read_bytes()
        with pytest.raises(FileNotFoundError, match="not a shard set") as info:
            load_shard_set(base.replace("http://", "http://user:s3cr3t@") + "/empty")
        assert "s3cr3t" not in str(info.value)


def test_redact_urls_and_secret_values():
    assert redact("failed: https://user:pw@host/a.tar?X-Amz-Signature=s3cr3t") == "failed: https://host/a.tar"
    text = ("S3FileSystem(key='AKIA', secret='S3CR3T') {'aws_session_token': 'T0K3N', 'key': 'AKIA2'} "
            'password=hunter2 "token": "abc"')
    got = redact(text)
    assert not any(s in got for s in ("S3CR3T", "T0K3N", "AKIA2", "hunter2", "abc")), got
    plain = "shard 3 sample key 0001_x: 12 bytes, expected 40 (keys are unique)"
    assert redact(plain) == plain


def test_redact_keeps_exception_names_and_ordinary_words():
    for text in ("NoCredentialsError: Unable to locate credentials",
                 "ExpiredTokenException: The security token included in the request is expired",
                 "PartialCredentialsError: Partial credentials found in env, missing: aws_secret_access_key"):
        assert redact(text) == text
    got = redact("token_error=T0K3N aws_secret_access_key: S3CR3T 'SessionToken': 'T2'")
    assert not any(s in got for s in ("T0K3N", "S3CR3T", "T2")), got


def test_store_errors_are_described_naming_the_url_and_where_credentials_come_from():
    from botocore.exceptions import NoCredentialsError

    url, so = "s3://no-such-bucket/shards/pool/index.json", {"s3": {"client_kwargs": {"endpoint_url": "http://h:9"}}}
    bucket = storage_error(url, s3_client_error("NoSuchBucket", 404), so)
    assert isinstance(bucket, BucketNotFound) and isinstance(bucket, FileNotFoundError) and is_not_found(bucket)
    assert str(bucket).startswith("s3://no-such-bucket: the bucket does not exist (endpoint http://h:9)")
    denied = {"InvalidAccessKeyId": "does not know the access key", "SignatureDoesNotMatch": "secret does not match",
              "ExpiredToken": "expired", "AccessDenied": "no permission", "403": "403 Forbidden"}
    for code, words in denied.items():
        error = storage_error(url, s3_client_error(code, 403, "HeadObject"))
        assert isinstance(error, StorageAccessDenied) and isinstance(error, PermissionError), code
        assert not is_transient(error)
        text = str(error)
        assert text.startswith(f"{url}: access denied (") and words in text, text
        assert all(w in text for w in ('"key"', '"secret"', '"token"', "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "anon"))
    missing = describe_storage_error(url, NoCredentialsError())
    assert missing.startswith(f"{url}: no credentials found; credentials come from --storage-options"), missing
    # Not about the store: a missing object, clock skew (another 403), a server error, a local file.
    for error in (s3_client_error("NoSuchKey", 404), s3_client_error("RequestTimeTooSkewed", 403),
                  s3_client_error("InternalError", 500), FileNotFoundError("x"), ConnectionResetError()):
        assert describe_storage_error(url, error) is None and storage_error(url, error) is None
    assert "https:// needs" in describe_storage_error("https://h/a", s3_client_error("403", 403))


def test_read_location_raises_the_described_error_at_once(monkeypatch):
    flaky = _Flaky([s3_client_error("SignatureDoesNotMatch", 403)])
    monkeypatch.setattr(storage, "filesystem", lambda url, so=None: flaky)
    with pytest.raises(StorageAccessDenied, match=r"^s3://b/k: access denied \(the secret does not match"):
        read_location("s3://b/k", retries=3, backoff=0)
    assert flaky.calls == 1
    flaky = _Flaky([s3_client_error("NoSuchBucket", 404)])
    with pytest.raises(BucketNotFound, match=r"^s3://b: the bucket does not exist"):
        load_shard_set("s3://b/set")  # the bucket, not "not a shard set"
