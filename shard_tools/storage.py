"""How every tool reaches storage: local folders and fsspec URLs (`s3://` through s3fs, `http(s)://`, ...).

One module owns, for the shard tools and the trainer alike:
- URLs: `protocol_of`, `is_url`, `join`, `parent`, `resolve`, `fs_path`, and `redact` for messages;
- storage options: `parse_storage_options` (`--storage-options` as inline JSON or the path of a JSON file),
  `options_for` (the options that apply to one URL) and `redact_options` (what a run may write down);
- clients: `filesystem`, one fsspec client per process for a protocol, its options and the AWS environment;
- errors: `http_status`, `is_transient` (worth retrying), `is_not_found`, and `describe_storage_error` /
  `storage_error` / `check_access` for what users trip over (a missing bucket, missing or rejected
  credentials): one line naming the URL and where credentials come from;
- whole-file reads: `read_location` (manifests, images, `index.json`), retried.
Output folders (whole files published atomically) are in `shard_tools/outputs.py`.

Storage options come in two shapes:
- flat, for every remote URL: `{"anon": true}`;
- per protocol: `{"s3": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}, "https": {...}}`
  (`http` and `https`, `s3` and `s3a` stand in for each other).
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

PROTOCOL_KEYS = ("file", "local", "s3", "s3a", "gs", "gcs", "az", "abfs", "http", "https", "hf", "ftp", "sftp",
                 "memory")
_ALIASES = {"https": ("https", "http"), "http": ("http", "https"), "s3a": ("s3a", "s3"), "s3": ("s3", "s3a"),
            "local": ("local", "file"), "file": ("file", "local")}

# ---------------------------------------------------------------------------------------------------
# URLs.


def protocol_of(url: str) -> str:
    """`s3` for `s3://b/k`, `file` for a local path."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


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
    """`url` as its filesystem names it: the bucket/key for s3, the whole URL for http(s), a local path."""
    return fsspec.get_filesystem_class(protocol_of(url))._strip_protocol(url)


_USERINFO = re.compile(r"([a-zA-Z][\w+.-]*://)[^/@\s]*@")
_QUERY = re.compile(r"([a-zA-Z][\w+.-]*://[^\s?]*)\?[^\s'\"]*")
_SECRET_NAME = re.compile(r"key|secret|token|password|passwd|credential|session|signature", re.IGNORECASE)
# `'aws_secret_access_key': 'X'`, `"token": "X"`, `password=X` in a message or a traceback.
# An exception's type name is not a secret's name (`NoCredentialsError: Unable to ...`), hence the lookahead.
_SECRET_PAIR = re.compile(r"""(['"]?\b(?![\w-]*(?-i:Error|Exception|Warning)['"]?\s*[:=])"""
                          r"""[\w-]*(?:secret|token|password|passwd|credential|signature|key_id|"""
                          r"""access_key)[\w-]*['"]?\s*[:=]\s*|['"]key['"]\s*:\s*)(['"]?)[^'"\s,}&)]+""",
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
    """The fsspec options for `url`: the per-protocol entry if options are given per protocol, else all of them
    (for remote URLs only); for s3, the endpoint and region from the environment when the options name none."""
    so = storage_options or {}
    protocol = protocol_of(url)
    if any(k in PROTOCOL_KEYS and isinstance(v, dict) for k, v in so.items()):
        opts = next((so[name] for name in _ALIASES.get(protocol, (protocol,)) if name in so), {})
    else:
        opts = {} if protocol in ("file", "local") else so
    opts = copy.deepcopy(opts)
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = opts.setdefault("client_kwargs", {})
        if endpoint and "endpoint_url" not in opts and "endpoint_url" not in client_kwargs:
            client_kwargs["endpoint_url"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region and "region_name" not in client_kwargs:
            client_kwargs["region_name"] = region
        if not client_kwargs:
            opts.pop("client_kwargs")
    return opts


# ---------------------------------------------------------------------------------------------------
# Clients.

# Environment that decides where an object store client connects and as whom: part of the cache key, so a
# process whose endpoint or credentials change (a test server restarted, another profile) gets a new client.
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE",
               "AWS_CONFIG_FILE")
_CLIENTS: dict[tuple, fsspec.AbstractFileSystem] = {}
_CLIENTS_LOCK = threading.Lock()


def filesystem(url: str, storage_options: dict | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for `url`: one client per process for its protocol, its options (`options_for`)
    and the AWS environment, shared by every reader and writer in the process.

    The process id is part of the key, so a forked DataLoader worker makes its own client (an async client's
    event loop and connections must not cross a fork), and fsspec's own instance cache is never used (it would
    hand back a client made for another endpoint or another process)."""
    protocol = protocol_of(url)
    opts = options_for(url, storage_options)
    key = (os.getpid(), protocol, json.dumps(opts, sort_keys=True, default=repr),
           tuple(os.environ.get(k) for k in _CLIENT_ENV))
    with _CLIENTS_LOCK:
        fs = _CLIENTS.get(key)
        if fs is None:
            fs = _CLIENTS[key] = fsspec.filesystem(protocol, skip_instance_cache=True, **opts)
    return fs


# ---------------------------------------------------------------------------------------------------
# Errors.

_TRANSIENT_NAME = re.compile(
    r"Timeout|Connection|Incomplete|Streaming|Payload|Disconnected|Protocol|Endpoint|ReadError|Reset|Broken|"
    r"Throttl|SlowDown|ServiceUnavailable|RemoteDisconnected|ChunkedEncoding|HTTPClient|ServerDisconnected"
)
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "TooManyRequests"}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_IO_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "http", "fsspec", "s3fs", "ssl",
               "socket")


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
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str((response.get("Error") or {}).get("Code", ""))
    return None


def _chain(e: BaseException, depth: int = 5) -> list[BaseException]:
    chain = [e]
    cause = e.__cause__ or e.__context__
    while cause is not None and len(chain) < depth:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def is_not_found(e: BaseException) -> bool:
    """Whether an error says the object does not exist (FileNotFoundError, HTTP 404/410, NoSuchKey)."""
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
        if any(t in str(err) for t in ("SlowDown", "reduce your request rate", "Throttl")):
            return True
        module = type(err).__module__ or ""
        if module.split(".")[0] in _IO_MODULES and _TRANSIENT_NAME.search(type(err).__name__):
            return True
    # A plain OSError from a remote filesystem (EIO, short reads, s3fs's wrapped server errors) is usually a
    # hiccup; a persistent one fails after the retries run out.
    return isinstance(e, OSError)


class BucketNotFound(ToolError, FileNotFoundError):
    """The bucket of a URL does not exist (not just the object): the message names the bucket and endpoint."""


class StorageAccessDenied(ToolError, PermissionError):
    """The store refused the request, or there were no credentials to send: the message names the URL and where
    credentials come from."""


_DENIED = {"InvalidAccessKeyId": "the store does not know the access key",
           "SignatureDoesNotMatch": "the secret does not match the access key",
           "ExpiredToken": "the session token has expired", "TokenRefreshRequired": "the session token has expired",
           "InvalidToken": "the session token is not valid", "AccessDenied": "wrong credentials, or no permission",
           "AllAccessDisabled": "all access to this bucket is disabled", "403": "wrong credentials, or no permission"}
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")
S3_CREDENTIALS_HINT = ("credentials come from --storage-options (keys \"key\", \"secret\", \"token\" or \"profile\"), "
                       "the variables AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or a profile "
                       "(AWS_PROFILE, ~/.aws/credentials); a public bucket needs {\"anon\": true}; see docs/storage.md")


def _endpoint(url: str, storage_options: dict | None) -> str:
    opts = options_for(url, storage_options)
    endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    return f"endpoint {redact(str(endpoint))}" if endpoint else "at AWS: no endpoint set"


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
    chain = _chain(error)
    codes = [c for c in map(_error_code, chain) if c]
    if "NoSuchBucket" in codes:
        return BucketNotFound, (f"{_bucket_url(url)}: the bucket does not exist ({_endpoint(url, storage_options)}): "
                                "check its name and the endpoint, or create it (docs/storage.md)")
    protocol = protocol_of(url)
    hint = (S3_CREDENTIALS_HINT if protocol in ("s3", "s3a")
            else f"pass the credentials {protocol}:// needs in --storage-options")
    missing = next((e for e in chain if type(e).__name__ in _NO_CREDENTIALS), None)
    if missing is not None:
        what = "no credentials found" if type(missing).__name__ == "NoCredentialsError" else redact(str(missing))
        return StorageAccessDenied, f"{redact(url)}: {what}; {hint}"
    code = next((c for c in codes if c in _DENIED), None)
    if code is None and not codes and 403 in map(http_status, chain):  # (a 403 with another code: clock skew, ...)
        code = "403"
    if code is None:
        return None
    label = "403 Forbidden" if code == "403" else code
    return StorageAccessDenied, f"{redact(url)}: access denied ({_DENIED[code]}: {label}); {hint}"


def check_access(url: str, storage_options: dict | None = None, fs=None) -> None:
    """Fail early on an `s3://` URL whose bucket is missing or refuses these credentials (BucketNotFound,
    StorageAccessDenied), with one ListObjectsV2 of at most one key; writers call it before any work. Other
    protocols are not checked."""
    if protocol_of(url) not in ("s3", "s3a"):
        return
    fs = fs if fs is not None else filesystem(url, storage_options)
    bucket, _, prefix = fs_path(url).partition("/")
    try:
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
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
    fs, path = filesystem(url, storage_options), fs_path(url)
    for attempt in range(retries + 1):
        try:
            return fs.cat_file(path)
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
