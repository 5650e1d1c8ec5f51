"""`gs://` (and `gcs://`) through gcsfs: GETs on the JSON API's media endpoint with `Range: bytes=a-b`, streamed;
listing with the objects list (prefix and delimiter), page by page, of a folder or of the objects in it
whose names start with a prefix.

The client is gcsfs's JSON-API filesystem (`gcsfs.core.GCSFileSystem`). Newer gcsfs versions hand out an
"extended" client by default that first asks Google's gRPC control API what kind each bucket is; an emulator or
a GCS-compatible store cannot answer it (each ask waits a minute), and these reads need none of it. Rapid
(zonal) buckets, which only the gRPC API reads, are therefore not supported.

Options are gcsfs's: `token` (a service-account JSON file, "google_default", "cloud", "anon"), `project`,
`endpoint_url` (an emulator: also `STORAGE_EMULATOR_HOST`), `requester_pays`, ...
"""

from __future__ import annotations

import os

from shard_tools.protocols.base import Body, Errors, MissingBucket, Protocol, blocking, check_range, folder_prefix


def make(opts: dict):
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(skip_instance_cache=True, **opts)


async def get(fs, path: str, start: int | None, end: int | None) -> Body:
    from gcsfs.retry import validate_response

    session = await fs._set_session()
    headers = fs._get_headers(None if start is None else {"Range": f"bytes={start}-{end - 1}"})
    timeout = {} if fs.requests_timeout is None else {"timeout": fs.requests_timeout}
    r = await session.get(fs.url(path), headers=headers, **timeout)
    try:
        if r.status >= 400:
            validate_response(r.status, await r.read(), path)  # raises gcsfs's error (FileNotFoundError, ...)
        check_range(r.status, r.content_length, start, end)
    except BaseException:
        r.release()
        raise
    return Body(r.content.read, r.release)


async def _objects(fs, bucket: str, **params) -> dict:
    """One page of the objects list; a bucket that does not exist raises MissingBucket."""
    try:
        return await fs._call("GET", "b/{}/o", bucket, json_out=True, **params)
    except FileNotFoundError as e:  # (an empty prefix of an existing bucket is an empty page, never a 404)
        raise MissingBucket(f"gs://{bucket}: no such bucket") from e


async def list_prefix(fs, path: str, prefix: str, visit) -> None:
    """The objects list of the folder's objects whose names start with `prefix`, page by page."""
    bucket, key, _ = fs.split_path(path)
    folder, token = folder_prefix(key), None
    cut = len(folder)
    while True:
        page = await _objects(fs, bucket, prefix=folder + prefix, delimiter="/", pageToken=token)
        for item in page.get("items", []):
            if item["name"] != folder:  # (a folder's own placeholder object)
                visit(item["name"][cut:], int(item["size"]))
        token = page.get("nextPageToken")
        if not token:
            return


def list_files(fs, path: str, visit) -> None:
    blocking(fs, list_prefix, fs, path, "", visit)


def probe(fs, path: str) -> None:
    """One objects list of at most one object: a missing bucket, or the credentials refused."""
    bucket, key, _ = fs.split_path(path)
    blocking(fs, _objects, fs, bucket, prefix=key, maxResults=1)


def error_code(e: BaseException) -> str | None:
    """gcsfs's HttpError carries the HTTP status as `code`; its 403 is an OSError "Forbidden: ..."."""
    if type(e).__name__ == "HttpError" and type(e).__module__.startswith("gcsfs"):
        return str(getattr(e, "code", "") or "")
    if isinstance(e, OSError) and str(e).startswith("Forbidden: "):
        return "403"
    return None


def endpoint(opts: dict) -> str:
    url = opts.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
    return f"endpoint {url}" if url else "at Google Cloud Storage: no endpoint set"


ERRORS = Errors(
    code=error_code,
    not_found=frozenset({"404"}),
    transient=frozenset({"408", "429", "500", "502", "503", "504"}),
    throttled=frozenset({"429", "503", "rateLimitExceeded"}),
    denied={"401": "the credentials were not accepted", "403": "wrong credentials, or no permission"},
    no_credentials=("DefaultCredentialsError",),
    transient_names=("TransportError", "RefreshError"),
    modules=("gcsfs", "google"),
    hint=("credentials come from --storage-options (\"token\": a service-account JSON file, \"google_default\", "
          "\"cloud\" or \"anon\"; \"project\"), GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default "
          "login`; a public bucket needs {\"token\": \"anon\"}; see docs/storage.md"),
)

GCS = Protocol(name="gs", schemes=("gs", "gcs"), get=get, list=list_files, list_prefix=list_prefix, probe=probe,
               errors=ERRORS, make=make,
               client_env=("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
                           "GCSFS_DEFAULT_PROJECT"),
               endpoint=endpoint)
