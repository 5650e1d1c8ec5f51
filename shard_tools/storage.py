"""How every tool reaches storage: local folders and fsspec URLs (`s3://` through s3fs, `gs://` through gcsfs,
`az://` through adlfs, `http(s)://`, ...). What differs between protocols is in their registry entries
(`shard_tools/protocols/`): this module asks them and names none.

One module owns, for the shard tools and the trainer alike:
- URLs: `protocol_of`, `is_url`, `join`, `parent`, `resolve`, `fs_path`, and `redact` for messages;
- storage options: `parse_storage_options` (`--storage-options` as inline JSON or the path of a JSON file),
  `options_for` (the options that apply to one URL) and `redact_options` (what a run may write down);
- clients: `filesystem`, one fsspec client per process for a protocol, its options and its environment;
- errors: `http_status`, `is_transient` (worth retrying), `is_throttled`, `is_not_found`, and `describe_storage_error` /
  `storage_error` / `check_access` for what users trip over (a missing bucket, missing or rejected
  credentials): one line naming the URL and where credentials come from;
- whole-file reads: `read_location` (manifests, images, `index.json`), retried.
Output folders (whole files published atomically) are in `shard_tools/outputs.py`.

Storage options come in two shapes:
- flat, for every remote URL: `{"anon": true}`;
- per protocol: `{"s3": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}, "https": {...}}`
  (a protocol's schemes stand in for each other: `http` and `https`, `s3` and `s3a`, `gs` and `gcs`,
  `az`, `abfs` and `abfss`).
For `s3://` the usual AWS environment variables work without any option: credentials through botocore
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, ...), the region from
`AWS_REGION`/`AWS_DEFAULT_REGION`, and the endpoint from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`
(S3-compatible stores: MinIO, Ceph, R2, ...). Options are never logged; URLs in messages are redacted.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import threading
import time
from pathlib import Path

import fsspec

from shard_tools.errors import ToolError
from shard_tools.protocols import ENTRIES, MissingBucket, protocol, scheme_of, schemes
from shard_tools.protocols.base import blocking

PROTOCOL_KEYS = schemes()  # the keys of per-protocol storage options

# ---------------------------------------------------------------------------------------------------
# URLs.

protocol_of = scheme_of  # `s3` for `s3://b/k`, `file` for a local path


def is_url(location: str) -> bool:
    """Whether `location` is read through an fsspec filesystem (`file://` paths are local)."""
    return "://" in location and not location.startswith("file://")


def join(folder: str, name: str) -> str:
    if is_url(folder):
        return folder.rstrip("/") + "/" + name
    return os.path.join(folder, name)


def parent(location: str) -> str:
    if is_url(location):
        return location.rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).resolve().parent)


def resolve(location: str, root: str) -> str:
    """`location` as given when absolute or a URL, else relative to `root` (a folder or a URL)."""
    if location.startswith("file://"):
        return location[len("file://"):]
    if is_url(location) or os.path.isabs(location):
        return location
    return join(root, location)


def fs_path(url: str) -> str:
    """`url` as its filesystem names it: the bucket/key for object stores, the whole URL for http(s), a local path."""
    return protocol(url).path(url)


_USERINFO = re.compile(r"([a-zA-Z][\w+.-]*://)[^/@\s]*@")
_QUERY = re.compile(r"([a-zA-Z][\w+.-]*://[^\s?]*)\?[^\s'\"]*")
_SECRET_NAME = re.compile(r"key|secret|token|password|passwd|credential|session|signature|connection_?string",
                          re.IGNORECASE)  # (an Azure connection string holds the account key)
# `'aws_secret_access_key': 'X'`, `"token": "X"`, `password=X`, `AccountKey=X` in a message or a traceback.
# An exception's type name is not a secret's name (`NoCredentialsError: Unable to ...`), hence the lookahead.
_SECRET_PAIR = re.compile(r"""(['"]?\b(?![\w-]*(?-i:Error|Exception|Warning)['"]?\s*[:=])"""
                          r"""[\w-]*(?:secret|token|password|passwd|credential|signature|key_id|"""
                          r"""access_key|accountkey|connection_?string)[\w-]*['"]?\s*[:=]\s*|['"]key['"]\s*:\s*)(['"]?)"""
                          r"""[^'"\s,}&)]+""",
                          re.IGNORECASE)


def redact(text: str) -> str:
    """Drop `user:password@` and query strings (pre-signed URLs carry signatures there) from every URL in
    `text`, and the values of secret-looking `name: value` pairs (`'secret': '...'`, `token=...`)."""
    text = _USERINFO.sub(r"\1", text)
    text = _QUERY.sub(r"\1", text)
    return _SECRET_PAIR.sub(r"\1\2<redacted>", text)


# ---------------------------------------------------------------------------------------------------
# Storage options.


def parse_storage_options(value: str | dict | None) -> dict:
    """`--storage-options`: JSON text, the path of a JSON file, or an already-parsed dict; {} when empty.
    Raises ValueError naming `--storage-options`."""
    if not value:
        return {}
    if isinstance(value, dict):
        return value
    text = str(value)
    if not text.lstrip().startswith(("{", "[")):
        try:
            text = Path(text).read_text()
        except OSError as e:
            raise ValueError(f"--storage-options: {value!r} is neither a JSON object nor a readable JSON file "
                             f"({e.strerror or e})") from None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        where = "" if text is value else f" in {value}"
        raise ValueError(f"--storage-options: not valid JSON{where} ({e.msg} at {e.pos})") from None
    if not isinstance(options, dict):
        raise ValueError("--storage-options: expected a JSON object")
    return options


def storage_options_arg(text: str) -> dict:
    """argparse type of `--storage-options` (inline JSON or a JSON file): a bad value is a usage error."""
    import argparse

    try:
        return parse_storage_options(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--storage-options: ")) from None


STORAGE_OPTIONS_HELP = ("fsspec options as inline JSON or the path of a JSON file, flat or per protocol: "
                        '\'{"s3": {"client_kwargs": {"endpoint_url": "http://..."}}}\' (default: the AWS '
                        "environment variables)")


def redact_options(text: str) -> str:
    """`--storage-options` as a run may write it down (config.json, checkpoints): JSON text with the value of
    every secret-looking name (key, secret, token, password, ...) replaced by "<redacted>". A path to a JSON
    file is kept as it is: the file's contents are never copied."""
    if not text or os.path.exists(text):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return "<redacted: not valid JSON>"

    def scrub(v):
        if isinstance(v, dict):
            return {k: "<redacted>" if _SECRET_NAME.search(str(k)) and not isinstance(x, (dict, list)) else scrub(x)
                    for k, x in v.items()}
        return [scrub(x) for x in v] if isinstance(v, list) else v

    return json.dumps(scrub(value), sort_keys=True)


def options_for(url: str, storage_options: dict | None = None) -> dict:
    """The fsspec options for `url`: the per-protocol entry if options are given per protocol (a scheme reads its
    aliases' entry: s3a the s3 one, http the https one, ...), else all of them (for remote URLs only); then what
    the protocol takes from the environment (s3: the endpoint and region) when the options name none."""
    so = storage_options or {}
    scheme, entry = protocol_of(url), protocol(url)
    if any(k in PROTOCOL_KEYS and isinstance(v, dict) for k, v in so.items()):
        names = (scheme, *(name for name in entry.schemes if name != scheme))
        opts = next((so[name] for name in names if name in so), {})
    else:
        opts = {} if entry.local else so
    opts = copy.deepcopy(opts)
    if entry.defaults is not None:
        entry.defaults(opts)
    return opts


# ---------------------------------------------------------------------------------------------------
# Clients.

_CLIENTS: dict[tuple, fsspec.AbstractFileSystem] = {}
_CLIENTS_LOCK = threading.Lock()


def filesystem(url: str, storage_options: dict | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for `url`: one client per process for its protocol, its options (`options_for`)
    and the environment that decides where or as whom it connects (the protocol's `client_env`: AWS_PROFILE,
    STORAGE_EMULATOR_HOST, ...), shared by every reader and writer in the process.

    The process id is part of the key, so a forked DataLoader worker makes its own client (an async client's
    event loop and connections must not cross a fork), and fsspec's own instance cache is never used (it would
    hand back a client made for another endpoint or another process)."""
    scheme, entry = protocol_of(url), protocol(url)
    opts = options_for(url, storage_options)
    key = (os.getpid(), scheme, json.dumps(opts, sort_keys=True, default=repr),
           tuple(os.environ.get(k) for k in entry.client_env))
    with _CLIENTS_LOCK:
        fs = _CLIENTS.get(key)
        if fs is None:
            fs = _CLIENTS[key] = entry.filesystem(scheme, opts)
    return fs


# ---------------------------------------------------------------------------------------------------
# Errors.

# What every protocol's errors share, then what each entry adds (shard_tools/protocols: Errors).
_ERRORS = [entry.errors for entry in ENTRIES]
_TRANSIENT_NAME = re.compile("|".join((
    "Timeout", "Connection", "Incomplete", "Streaming", "Payload", "Disconnected", "Protocol", "ReadError", "Reset",
    "Broken", "Throttl", "SlowDown", "ServiceUnavailable", "RemoteDisconnected", "ChunkedEncoding",
    "ServerDisconnected", *(name for e in _ERRORS for name in e.transient_names))))
_IO_MODULES = ("aiohttp", "urllib3", "requests", "http", "fsspec", "ssl", "socket",
               *(m for e in _ERRORS for m in e.modules))
_TRANSIENT_CODES = frozenset().union(*(e.transient for e in _ERRORS))
_NOT_FOUND_CODES = frozenset().union(*(e.not_found for e in _ERRORS))
_MISSING_BUCKET_CODES = frozenset().union(*(e.missing_bucket for e in _ERRORS))
_THROTTLED_CODES = frozenset().union(*(e.throttled for e in _ERRORS))
_THROTTLED_NAMES = ("Throttl", *(c for c in _THROTTLED_CODES if not c.isdigit()))  # in messages: SlowDown, ...
_NO_CREDENTIALS = tuple(name for e in _ERRORS for name in e.no_credentials)
_DENIED = {"403": "wrong credentials, or no permission", **{k: v for e in _ERRORS for k, v in e.denied.items()}}


def http_status(e: BaseException) -> int | None:
    """The HTTP status an error carries (aiohttp, requests, urllib, botocore's response metadata), if any."""
    for attr in ("status", "status_code"):  # not `code`: aiohttp's parser errors carry code 400 for a cut body
        v = getattr(e, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        meta = response.get("ResponseMetadata") or {}
        if isinstance(meta.get("HTTPStatusCode"), int):
            return meta["HTTPStatusCode"]
    return None


def _error_code(e: BaseException) -> str | None:
    """The store's error code an exception carries (each protocol entry reads its own client's errors)."""
    for errors in _ERRORS:
        code = errors.code(e)
        if code is not None:
            return code
    return None


def _chain(e: BaseException, depth: int = 5) -> list[BaseException]:
    chain = [e]
    cause = e.__cause__ or e.__context__
    while cause is not None and len(chain) < depth:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def is_not_found(e: BaseException) -> bool:
    """Whether an error says the object does not exist (FileNotFoundError, HTTP 404/410, NoSuchKey, BlobNotFound)."""
    if isinstance(e, FileNotFoundError):
        return True
    return http_status(e) in (404, 410) or _error_code(e) in _NOT_FOUND_CODES


def is_transient(e: BaseException) -> bool:
    """Whether an I/O error is worth retrying: reset connections, timeouts, truncated bodies, 5xx, throttling.
    Missing objects, denied access and other 4xx answers are not."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    chain = _chain(e)
    for err in chain:
        status = http_status(err)
        if status is not None:
            return status >= 500 or status in (408, 429)
        code = _error_code(err)
        if code is not None:
            return code in _TRANSIENT_CODES
    for err in chain:
        if isinstance(err, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if any(word in str(err) for word in _THROTTLED_NAMES):
            return True
        module = type(err).__module__ or ""
        if module.split(".")[0] in _IO_MODULES and _TRANSIENT_NAME.search(type(err).__name__):
            return True
    # A plain OSError from a remote filesystem (EIO, short reads, s3fs's wrapped server errors) is usually a
    # hiccup; a persistent one fails after the retries run out.
    return isinstance(e, OSError)


def is_throttled(e: BaseException) -> bool:
    """Whether an error asks to slow down: HTTP 429 or 503, or a protocol's throttling code (S3 SlowDown, Azure
    ServerBusy, GCS rateLimitExceeded, ...) in the error or its message."""
    for err in _chain(e):
        if http_status(err) in (429, 503) or _error_code(err) in _THROTTLED_CODES:
            return True
        if any(word in str(err) for word in ("429", "503", *_THROTTLED_NAMES)):
            return True
    return False


class BucketNotFound(ToolError, FileNotFoundError):
    """The bucket of a URL does not exist (not just the object): the message names the bucket and endpoint."""


class StorageAccessDenied(ToolError, PermissionError):
    """The store refused the request, or there were no credentials to send: the message names the URL and where
    credentials come from."""


def _endpoint(url: str, storage_options: dict | None) -> str:
    return redact(protocol(url).endpoint(options_for(url, storage_options)))


def _bucket_url(url: str) -> str:
    protocol, _, rest = url.partition("://")
    return redact(f"{protocol}://{rest.split('/', 1)[0]}")


def describe_storage_error(url: str, error: BaseException, storage_options: dict | None = None) -> str | None:
    """One line for the errors that are about the store rather than the object at `url`: a bucket that does not
    exist, no credentials, credentials refused (403, AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch,
    expired tokens). None for anything else (a missing object, a transient error, ...)."""
    found = _classify(url, error, storage_options)
    return found[1] if found else None


def storage_error(url: str, error: BaseException, storage_options: dict | None = None) -> ToolError | None:
    """`describe_storage_error` as an exception to raise (`from error`): BucketNotFound (a FileNotFoundError)
    or StorageAccessDenied (a PermissionError); None when the error is not about the store."""
    found = _classify(url, error, storage_options)
    return found[0](found[1]) if found else None


def _classify(url: str, error: BaseException, storage_options: dict | None) -> tuple[type, str] | None:
    chain, entry = _chain(error), protocol(url)
    codes = [c for c in map(_error_code, chain) if c]
    if any(isinstance(e, MissingBucket) for e in chain) or _MISSING_BUCKET_CODES.intersection(codes):
        return BucketNotFound, (f"{_bucket_url(url)}: the {entry.bucket_word} does not exist "
                                f"({_endpoint(url, storage_options)}): check its name and the endpoint, or create it "
                                "(docs/storage.md)")
    hint = entry.errors.hint or f"pass the credentials {protocol_of(url)}:// needs in --storage-options"
    missing = next((e for e in chain if type(e).__name__ in _NO_CREDENTIALS), None)
    if missing is not None:
        what = "no credentials found" if type(missing).__name__ == "NoCredentialsError" else redact(str(missing))
        return StorageAccessDenied, f"{redact(url)}: {what}; {hint}"
    code = next((c for c in codes if c in _DENIED), None)
    if code is None and not codes and 403 in map(http_status, chain):  # (a 403 with another code: clock skew, ...)
        code = "403"
    if code is None:
        return None
    label = {"403": "403 Forbidden", "401": "401 Unauthorized"}.get(code, code)
    return StorageAccessDenied, f"{redact(url)}: access denied ({_DENIED[code]}: {label}); {hint}"


def check_access(url: str, storage_options: dict | None = None, fs=None) -> None:
    """Fail early on an object-store URL whose bucket is missing or refuses these credentials (BucketNotFound,
    StorageAccessDenied), with the protocol's probe: one listing of at most one key (S3 ListObjectsV2, the GCS
    objects list, Azure List Blobs); writers call it before any work. Protocols without a probe are not checked."""
    entry = protocol(url)
    if entry.probe is None:
        return
    fs = fs if fs is not None else filesystem(url, storage_options)
    try:
        entry.probe(fs, entry.path(url, fs))
    except Exception as e:  # noqa: BLE001 - classified here
        error = storage_error(url, e, storage_options)
        if error is None:
            raise
        raise error from e


# ---------------------------------------------------------------------------------------------------
# Whole-file reads.


def read_location(url: str, storage_options: dict | None = None, retries: int = 3, backoff: float = 0.5) -> bytes:
    """All bytes of a local file or URL. Transient remote errors are retried with exponential backoff; a missing
    object raises FileNotFoundError at once (never retried), with the URL redacted; a missing bucket or refused
    credentials raise `storage_error`'s BucketNotFound / StorageAccessDenied."""
    if not is_url(url):
        with open(resolve(url, "."), "rb") as f:
            return f.read()
    fs, path, entry = filesystem(url, storage_options), fs_path(url), protocol(url)
    for attempt in range(retries + 1):
        try:  # (the protocol's GET: s3fs's cat_file asks for the object's metadata first, a HEAD request)
            return blocking(fs, entry.get_bytes, fs, path) if getattr(fs, "async_impl", False) else fs.cat_file(path)
        except Exception as e:  # fsspec backends raise many types (aiohttp, botocore, ...)
            error = storage_error(url, e, storage_options)
            if error is not None:
                raise error from e
            if is_not_found(e):
                raise FileNotFoundError(f"{redact(url)}: no such file") from e
            if attempt == retries or not is_transient(e):
                raise
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")
