"""What a storage protocol entry is (`Protocol`, `Errors`), and the generic fsspec behaviour an entry falls back on.

An entry does five things for one protocol family (s3 and s3a, gs and gcs, ...):
- GET bytes: `get(fs, path, start, end)` -> a `Body` being received (streamed), or the bytes when the protocol
  has no streamed GET; `start is None` asks for the whole object (an `.idx`, `index.json`), with no HEAD first;
- list a folder: `list(fs, path, visit)` calls `visit(name, size)` for every file directly in it, from one
  listing (None: the protocol cannot list, as http); object stores also list part of a folder,
  `await list_prefix(fs, path, prefix, visit)`: the files directly in it whose names start with `prefix`, on
  the filesystem's event loop, so that many prefixes are listed at once (shard_tools/listing.py);
- check a bucket: `probe(fs, path)` raises the store's error when the bucket is missing or refuses the
  credentials (None: not checked);
- path rules: its URL schemes (aliases) and how a URL becomes the path its filesystem takes;
- errors: the codes its client raises (`Errors`), which storage.py classifies.
Nothing here imports the clients (s3fs, gcsfs, adlfs): each protocol module imports its own when used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec


@dataclass(frozen=True)
class Body:
    """A response body being received: `read(n)` gives at most n bytes (b"" at the end; no argument: the rest),
    `close()` (maybe a coroutine) ends it, read or not."""

    read: Callable[..., Awaitable[bytes]]
    close: Callable[[], Any]


class MissingBucket(FileNotFoundError):
    """The store says the bucket (or container) itself does not exist, not just an object in it."""


class RangeIgnored(OSError):
    """A server that answered a ranged GET with the whole object."""


def check_range(status: int, length: int | None, start: int | None, end: int | None) -> None:
    """Raise RangeIgnored when a ranged GET (`start` not None) was answered with more than the range: a status
    other than 206 Partial Content, unless it is the whole object from byte 0 and no longer than asked."""
    if start is not None and status != 206 and (start > 0 or (length or 0) > end - start):
        raise RangeIgnored(f"the server ignores range requests (status {status})")


@dataclass(frozen=True)
class Errors:
    """How a protocol's client reports errors: the store's error codes and what they mean."""

    code: Callable[[BaseException], str | None] = lambda e: None  # the store's error code an exception carries
    not_found: frozenset[str] = frozenset()  # codes of a missing object
    missing_bucket: frozenset[str] = frozenset()  # codes of a missing bucket or container
    transient: frozenset[str] = frozenset()  # codes worth retrying
    throttled: frozenset[str] = frozenset()  # codes (and message words) that ask to slow down
    denied: Mapping[str, str] = field(default_factory=dict)  # code -> what the refusal means
    no_credentials: tuple[str, ...] = ()  # type names of the client's "no credentials found" errors
    transient_names: tuple[str, ...] = ()  # words in the type names of the client's transient errors
    modules: tuple[str, ...] = ()  # top-level modules whose exceptions are I/O errors
    hint: str = ""  # where credentials come from (one clause of a message)


def cat_range(fs, path: str, start: int | None, end: int | None) -> Awaitable[bytes]:
    """fsspec's `cat_file` (on the filesystem's loop, or a thread for a synchronous one): the bytes, not streamed."""
    if getattr(fs, "async_impl", False):
        return fs._cat_file(path, start=start, end=end)
    return asyncio.get_running_loop().run_in_executor(None, lambda: fs.cat_file(path, start=start, end=end))


def ls_files(fs, path: str, visit: Callable[[str, int], None]) -> None:
    """fsspec's `ls` with details: every file directly in `path`."""
    for entry in fs.ls(path, detail=True):
        if entry.get("type") == "file":
            visit(entry["name"].rstrip("/").rsplit("/", 1)[-1], int(entry.get("size") or 0))


def blocking(fs, fn, *args, **kwargs):
    """`await fn(*args, **kwargs)` on the event loop of the async filesystem `fs`, from synchronous code."""
    from fsspec.asyn import sync

    return sync(fs.loop, fn, *args, **kwargs)


def folder_prefix(key: str) -> str:
    """The key prefix of the objects directly in folder `key` ("" for a bucket's top)."""
    return key.rstrip("/") + "/" if key else ""


async def closed(result) -> None:
    """Await `result` when closing a body returned a coroutine."""
    if asyncio.iscoroutine(result):
        await result


@dataclass(frozen=True)
class Protocol:
    """One storage protocol family. The defaults are fsspec's generic behaviour (any protocol it knows)."""

    name: str
    schemes: tuple[str, ...]  # URL schemes, the first the canonical one; each stands in for the others in options
    get: Callable[..., Awaitable[Body | bytes]] = cat_range
    list: Callable[[Any, str, Callable[[str, int], None]], None] | None = ls_files
    list_prefix: Callable[[Any, str, str, Callable[[str, int], None]], Awaitable[None]] | None = None  # async
    probe: Callable[[Any, str], None] | None = None
    errors: Errors = Errors()
    local: bool = False  # files on this machine: the reader maps or preads them itself, no client
    make: Callable[[dict], fsspec.AbstractFileSystem] | None = None  # the client (None: fsspec.filesystem)
    defaults: Callable[[dict], None] | None = None  # fills options from the environment (s3: endpoint, region)
    client_env: tuple[str, ...] = ()  # environment variables that change where or as whom a client connects
    endpoint: Callable[[dict], str] = lambda opts: "no endpoint set"  # where a client with these options goes
    bucket_word: str = "bucket"  # what the store calls a bucket

    async def get_bytes(self, fs, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """All bytes of an object, or bytes [start, end), with this protocol's GET (no HEAD first)."""
        body = await self.get(fs, path, start, end)
        if not isinstance(body, Body):
            return body
        try:
            return await body.read()
        finally:
            await closed(body.close())

    def path(self, url: str, fs=None) -> str:
        """`url` as its filesystem names it (the bucket/key for object stores, the whole URL for http)."""
        owner = fs if fs is not None else fsspec.get_filesystem_class(url.split("://", 1)[0] if "://" in url
                                                                        else "file")
        return owner._strip_protocol(url)

    def filesystem(self, scheme: str, opts: dict) -> fsspec.AbstractFileSystem:
        """A new client for `scheme` with `opts` (fsspec's instance cache is not used)."""
        if self.make is not None:
            return self.make(opts)
        return fsspec.filesystem(scheme, skip_instance_cache=True, **opts)
