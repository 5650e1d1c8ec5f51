"""Storage protocols as a registry: one entry per protocol family, each in its own module.

    protocol("s3a://bucket/key")      # the S3 entry: GET (streamed, ranged or whole), listing, bucket check,
                                      # path rules and error codes (shard_tools/protocols/base.py: Protocol)

Entries: local files (`local.py`), S3 (`s3.py`), Google Cloud Storage (`gcs.py`), Azure Blob (`azure.py`) and
http(s) (`http.py`). A scheme without an entry (`memory://`, `hf://`, `ftp://`, ... any that fsspec knows) gets
fsspec's generic behaviour: whole responses through `cat_file` (a cut one keeps nothing), listing through
`ls`. storage.py (clients, options, errors), listing.py and stream_ssl/data/fetch.py ask the registry; none
of them names a protocol. Adding one: a module with its `Protocol`, listed in ENTRIES.
"""

from __future__ import annotations

import functools

from shard_tools.protocols.azure import AZURE
from shard_tools.protocols.base import Body, Errors, MissingBucket, Protocol, RangeIgnored, closed
from shard_tools.protocols.gcs import GCS
from shard_tools.protocols.http import HTTP
from shard_tools.protocols.local import LOCAL
from shard_tools.protocols.s3 import S3

__all__ = ["Body", "Errors", "MissingBucket", "Protocol", "RangeIgnored", "ENTRIES", "OTHER_SCHEMES", "closed",
           "protocol", "scheme_of", "schemes"]

ENTRIES: tuple[Protocol, ...] = (LOCAL, S3, GCS, AZURE, HTTP)
# Schemes without an entry that may still key per-protocol storage options.
OTHER_SCHEMES = ("hf", "ftp", "sftp", "memory")
_BY_SCHEME = {scheme: entry for entry in ENTRIES for scheme in entry.schemes}


def scheme_of(url: str) -> str:
    """`s3` for `s3://b/k`, `file` for a local path."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def protocol(url: str) -> Protocol:
    """The entry of a URL (a local path: the local one); fsspec's generic behaviour for a scheme without one."""
    scheme = scheme_of(url)
    entry = _BY_SCHEME.get(scheme)
    return entry if entry is not None else _generic(scheme)


@functools.cache
def _generic(scheme: str) -> Protocol:
    return Protocol(name=scheme, schemes=(scheme,))


def schemes() -> tuple[str, ...]:
    """Every scheme that may key per-protocol storage options."""
    return (*_BY_SCHEME, *OTHER_SCHEMES)
