"""`http://` and `https://` through fsspec's HTTPFileSystem (aiohttp): GET with `Range: bytes=a-b`, streamed.

A server that answers a ranged GET with the whole object is an error (RangeIgnored), not a silent full
download. There is no listing: shard sets over http are not checked before training."""

from __future__ import annotations

from shard_tools.protocols.base import Body, Protocol, check_range


async def get(fs, url: str, start: int | None, end: int | None) -> Body:
    session = await fs.set_session()
    kw = dict(fs.kwargs)
    if start is not None:
        kw["headers"] = {**kw.get("headers", {}), "Range": f"bytes={start}-{end - 1}"}
    r = await session.get(fs.encode_url(url), **kw)
    try:
        if r.status in (404, 410):
            raise FileNotFoundError(url)
        r.raise_for_status()
        check_range(r.status, r.content_length, start, end)
    except BaseException:
        r.release()
        raise
    return Body(r.content.read, r.release)


# (its errors are aiohttp's, with the HTTP status: storage.py's generic rules classify them)
HTTP = Protocol(name="http", schemes=("https", "http"), get=get, list=None)
