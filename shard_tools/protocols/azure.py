"""`az://`, `abfs://` and `abfss://` (Azure Blob Storage) through adlfs: Get Blob with `x-ms-range: bytes=a-b`,
streamed; listing with List Blobs (prefix and delimiter), page by page, of a folder or of the blobs in it whose
names start with a prefix.

GETs go through the blob client's own pipeline (its credentials and API version) with the client's retries off
(`retry_total=0`): the reader retries, resuming at sample boundaries, as for every store. The body is read as it
arrives, from the pipeline's aiohttp response.

Options are adlfs's: `account_name` with `account_key`, `sas_token` or `credential`, or `connection_string`
(an emulator such as Azurite: its `BlobEndpoint`); without options, adlfs reads `AZURE_STORAGE_*` variables.
"""

from __future__ import annotations

import os
import re

from shard_tools.protocols.base import Body, Errors, Protocol, RangeIgnored, blocking, check_range, folder_prefix


async def get(fs, path: str, start: int | None, end: int | None) -> Body:
    container, blob, version = fs.split_path(path)
    client = fs.service_client.get_blob_client(container, blob)
    response = await client._client.blob.download(  # the generated operation: x-ms-range, streamed
        range=None if start is None else f"bytes={start}-{end - 1}", version_id=version, retry_total=0,
        cls=lambda pipeline_response, body, headers: pipeline_response.http_response)
    r = response.internal_response  # aiohttp's response
    try:
        check_range(r.status, r.content_length, start, end)
    except RangeIgnored:
        r.release()
        raise
    return Body(r.content.read, r.release)


async def list_prefix(fs, path: str, prefix: str, visit) -> None:
    """List Blobs of the folder's blobs whose names start with `prefix`, page by page."""
    container, key, _ = fs.split_path(path)
    folder = folder_prefix(key)
    client = fs.service_client.get_container_client(container)
    async for item in client.walk_blobs(name_starts_with=folder + prefix, delimiter="/"):
        if getattr(item, "size", None) is not None:  # (a BlobPrefix, a subfolder, has no size)
            visit(item.name[len(folder):], int(item.size))


def list_files(fs, path: str, visit) -> None:
    blocking(fs, list_prefix, fs, path, "", visit)


async def _first(fs, path: str) -> None:
    container, key, _ = fs.split_path(path)
    async for _ in fs.service_client.get_container_client(container).list_blobs(name_starts_with=key,
                                                                                results_per_page=1):
        return


def probe(fs, path: str) -> None:
    """One List Blobs of at most one blob: ContainerNotFound, or the credentials refused."""
    blocking(fs, _first, fs, path)


def error_code(e: BaseException) -> str | None:
    """azure-core errors: `error_code`, or the `x-ms-error-code` header of the answer."""
    code = getattr(e, "error_code", None)
    if code is None:
        headers = getattr(getattr(e, "response", None), "headers", None)
        code = headers.get("x-ms-error-code") if headers is not None else None
    return str(code) if code is not None else None


def endpoint(opts: dict) -> str:
    """The blob endpoint of a connection string, else the account (options first, then adlfs's variables)."""
    text = opts.get("connection_string") or os.environ.get("AZURE_STORAGE_CONNECTION_STRING") or ""
    found = re.search(r"BlobEndpoint=([^;]+)", text)
    if found:
        return f"endpoint {found.group(1)}"
    named = re.search(r"AccountName=([^;]+)", text)
    account = opts.get("account_name") or (named and named.group(1)) or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    return f"account {account}" if account else "no account set"


ERRORS = Errors(
    code=error_code,
    not_found=frozenset({"BlobNotFound", "ContainerNotFound", "ResourceNotFound"}),
    missing_bucket=frozenset({"ContainerNotFound"}),
    transient=frozenset({"ServerBusy", "OperationTimedOut", "InternalError", "IngressOverAccountLimit",
                         "EgressOverAccountLimit", "TooManyRequests"}),
    throttled=frozenset({"ServerBusy", "IngressOverAccountLimit", "EgressOverAccountLimit", "TooManyRequests"}),
    denied={"AuthenticationFailed": "the account key, SAS token or credential was not accepted",
            "AuthorizationFailure": "wrong credentials, or no permission",
            "AuthorizationPermissionMismatch": "no permission",
            "InsufficientAccountPermissions": "no permission", "NoAuthenticationInformation": "no credentials sent",
            "InvalidAuthenticationInfo": "the credentials are not valid"},
    no_credentials=("CredentialUnavailableError",),
    transient_names=("ServiceRequest", "ServiceResponse", "IncompleteRead"),
    modules=("azure", "adlfs"),
    hint=("credentials come from --storage-options (\"account_name\" with \"account_key\", \"sas_token\" or "
          "\"credential\", or \"connection_string\"), or the variables AZURE_STORAGE_CONNECTION_STRING, "
          "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN; a public "
          "container needs {\"anon\": true}; see docs/storage.md"),
)

AZURE = Protocol(name="az", schemes=("az", "abfs", "abfss"), get=get, list=list_files, list_prefix=list_prefix,
                 probe=probe, errors=ERRORS,
                 client_env=("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME",
                             "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CLIENT_ID",
                             "AZURE_STORAGE_CLIENT_SECRET", "AZURE_STORAGE_TENANT_ID", "AZURE_STORAGE_ANON"),
                 endpoint=endpoint, bucket_word="container")
