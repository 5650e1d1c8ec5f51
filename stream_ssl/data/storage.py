"""fsspec filesystems for shard URLs (local paths, `s3://` through s3fs, `http(s)://`), storage options,
which errors are worth retrying, and URL redaction for messages.

Storage options come in two shapes:
- flat, for every URL: `{"anon": true}`;
- per protocol: `{"s3": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}, "https": {...}}`.
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

import fsspec

PROTOCOL_KEYS = ("file", "local", "s3", "s3a", "http", "https", "gs", "gcs", "az", "abfs", "hf", "memory")
_TRANSIENT_NAME = re.compile(
    r"Timeout|Connection|Incomplete|Streaming|Payload|Disconnected|Protocol|Endpoint|ReadError|Reset|Broken|"
    r"Throttl|SlowDown|ServiceUnavailable|RemoteDisconnected|ChunkedEncoding|HTTPClient|ServerDisconnected"
)
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "TooManyRequests"}


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def redact(text: str) -> str:
    """Drop `user:password@` and query strings (pre-signed URLs carry signatures there) from every URL in text."""
    text = re.sub(r"([a-zA-Z][\w+.-]*://)[^/@\s]*@", r"\1", text)
    return re.sub(r"([a-zA-Z][\w+.-]*://[^\s?]*)\?[^\s'\"]*", r"\1", text)


_SECRET_NAME = re.compile(r"key|secret|token|password|passwd|credential|session|signature", re.IGNORECASE)


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


def parse_storage_options(text: str | dict | None) -> dict:
    """`--storage-options` as JSON text (or a path to a JSON file, or an already-parsed dict)."""
    if not text:
        return {}
    if isinstance(text, dict):
        return text
    if os.path.exists(text):
        with open(text) as f:
            text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--storage-options: not valid JSON ({e.msg} at {e.pos})") from None
    if not isinstance(value, dict):
        raise ValueError("--storage-options: expected a JSON object")
    return value


def options_for(url: str, storage_options: dict | None = None) -> dict:
    """The fsspec options for `url`: the per-protocol entry if options are given per protocol, else all of them;
    for s3, the endpoint from the environment when the options name none."""
    so = storage_options or {}
    protocol = protocol_of(url)
    if any(k in PROTOCOL_KEYS and isinstance(v, dict) for k, v in so.items()):
        aliases = {"https": ("https", "http"), "http": ("http", "https"), "s3a": ("s3a", "s3"),
                   "local": ("local", "file")}
        opts: dict = {}
        for name in aliases.get(protocol, (protocol,)):
            if name in so:
                opts = so[name]
                break
    else:
        opts = so
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


def filesystem(url: str, storage_options: dict | None = None, fresh: bool = False):
    """(filesystem, path) for `url`. `fresh` skips fsspec's instance cache: a DataLoader worker must not reuse
    an async filesystem (and its event loop and connections) created in its parent before the fork."""
    opts = options_for(url, storage_options)
    if fresh:
        opts["skip_instance_cache"] = True
    return fsspec.core.url_to_fs(url, **opts)


def http_status(e: BaseException) -> int | None:
    for attr in ("status", "status_code"):
        v = getattr(e, attr, None)
        if isinstance(v, int):
            return v
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        meta = response.get("ResponseMetadata") or {}
        if isinstance(meta.get("HTTPStatusCode"), int):
            return meta["HTTPStatusCode"]
    return None


def is_transient(e: BaseException) -> bool:
    """Whether an I/O error is worth retrying: reset connections, timeouts, truncated bodies, 5xx, throttling.
    Missing objects, denied access and other 4xx answers are not."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    chain = [e]
    cause = e.__cause__ or e.__context__
    while cause is not None and len(chain) < 5:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for err in chain:
        status = http_status(err)
        if status is not None:
            return status >= 500 or status in (408, 429)
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            return code in _TRANSIENT_CODES
    for err in chain:
        if isinstance(err, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if any(t in str(err) for t in ("SlowDown", "reduce your request rate", "Throttl")):
            return True
        module = type(err).__module__ or ""
        if module.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "http", "fsspec",
                                    "s3fs", "ssl", "socket") and _TRANSIENT_NAME.search(type(err).__name__):
            return True
    # A plain OSError from a remote filesystem (EIO, short reads, s3fs's wrapped server errors) is usually a
    # hiccup; a persistent one fails after the retries run out.
    return isinstance(e, OSError)
