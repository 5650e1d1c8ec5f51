"""`s3://` (and `s3a://`) through s3fs: GetObject with `Range: bytes=a-b`, streamed; ListObjectsV2 page by page,
of a folder or of the keys in it that start with a prefix.

Options default to the AWS environment: the endpoint from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`
(S3-compatible stores), the region from `AWS_REGION` / `AWS_DEFAULT_REGION`; credentials come through botocore.
"""

from __future__ import annotations

import os

from shard_tools.protocols.base import Body, Errors, Protocol, blocking, folder_prefix


async def get(fs, path: str, start: int | None, end: int | None) -> Body:
    bucket, key, version = fs.split_path(path)
    extra = {"VersionId": version} if version else {}
    if start is not None:
        extra["Range"] = f"bytes={start}-{end - 1}"
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **extra)
    return Body(resp["Body"].read, resp["Body"].close)


def list_files(fs, path: str, visit) -> None:
    blocking(fs, list_prefix, fs, path, "", visit)


async def list_prefix(fs, path: str, prefix: str, visit) -> None:
    """ListObjectsV2 of the folder's keys that start with `prefix`, page by page (s3fs retries each page); no
    listing cache is read or filled."""
    bucket, key, _ = fs.split_path(path)
    folder = folder_prefix(key)
    cut = len(bucket) + 1 + len(folder)  # s3fs names an entry "bucket/key"
    async for entry in fs._iterdir(bucket, prefix=folder + prefix, delimiter="/"):
        if entry.get("type") == "file":
            visit(entry["name"][cut:], int(entry["size"]))


def probe(fs, path: str) -> None:
    """One ListObjectsV2 of at most one key: NoSuchBucket, or the credentials refused."""
    bucket, _, prefix = path.partition("/")
    fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)


POOL_CONNECTIONS = 64  # botocore keeps 10 connections per client: the reader has up to 64 GETs in flight


def defaults(opts: dict) -> None:
    config = opts.setdefault("config_kwargs", {})
    config.setdefault("max_pool_connections", POOL_CONNECTIONS)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = opts.setdefault("client_kwargs", {})
    if endpoint and "endpoint_url" not in opts and "endpoint_url" not in client_kwargs:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region and "region_name" not in client_kwargs:
        client_kwargs["region_name"] = region
    if not client_kwargs:
        opts.pop("client_kwargs")


def endpoint(opts: dict) -> str:
    url = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    return f"endpoint {url}" if url else "at AWS: no endpoint set"


def error_code(e: BaseException) -> str | None:
    """botocore's `response["Error"]["Code"]` ("" when the answer had no body to name one)."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return str((response.get("Error") or {}).get("Code", ""))
    return None


HINT = ("credentials come from --storage-options (keys \"key\", \"secret\", \"token\" or \"profile\"), the variables "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or a profile (AWS_PROFILE, ~/.aws/credentials); "
        "a public bucket needs {\"anon\": true}; see docs/storage.md")

ERRORS = Errors(
    code=error_code,
    not_found=frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"}),
    missing_bucket=frozenset({"NoSuchBucket"}),
    transient=frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                         "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "TooManyRequests"}),
    throttled=frozenset({"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests",
                         "reduce your request rate"}),
    denied={"InvalidAccessKeyId": "the store does not know the access key",
            "SignatureDoesNotMatch": "the secret does not match the access key",
            "ExpiredToken": "the session token has expired", "TokenRefreshRequired": "the session token has expired",
            "InvalidToken": "the session token is not valid", "AccessDenied": "wrong credentials, or no permission",
            "AllAccessDisabled": "all access to this bucket is disabled"},
    no_credentials=("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"),
    transient_names=("Endpoint", "HTTPClient"),  # botocore's EndpointConnectionError, HTTPClientError
    modules=("botocore", "aiobotocore", "s3fs"),
    hint=HINT,
)

S3 = Protocol(
    name="s3", schemes=("s3", "s3a"), get=get, list=list_files, list_prefix=list_prefix, probe=probe, errors=ERRORS,
    defaults=defaults,
    client_env=("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE",
                "AWS_CONFIG_FILE"),
    endpoint=endpoint,
)
