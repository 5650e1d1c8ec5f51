"""The peers of benchmarks/stream.py: LitData and MosaicML Streaming, converted from the same tar shards and
timed over one pass. Run by stream.py with the Python given as --peers-python (these packages pin versions
that clash with this project's); prints one JSON line.

    python stream_peers.py convert --tars a.tar,b.tar --out DIR       # DIR/litdata, DIR/mosaic
    python stream_peers.py measure litdata|mosaic --where DIR_OR_S3 [--endpoint URL] --cache DIR [--batch 64]
                           [--workers 2]     # in their StreamingDataLoader (Mosaic: torch's) with 2 workers
    python stream_peers.py --quick       # both steps on a toy local set, against a plain read of its tars

The quick mode checks that the script still runs: it converts a few small generated tars, measures each peer
that is installed over them locally, and prints samples/s next to reading the same tars with tarfile; a peer
that is not installed is named with the reason its row is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.stream import Pass, touch, write_set  # noqa: E402

KEY, SECRET, REGION = "testing-key", "testing-secret-DO-NOT-LOG", "us-east-1"  # stream_ssl/testing/servers.py


def samples_of(tars: list[str]):
    for path in tars:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    yield m.name.rsplit(".", 2)[0], tar.extractfile(m).read()


def _litdata_item(pair):
    return {"key": pair[0], "jpg": pair[1]}


def convert(tars: list[str], out: str) -> dict:
    done = {}
    try:
        import litdata

        items = list(samples_of(tars))
        litdata.optimize(fn=_litdata_item, inputs=items, output_dir=os.path.join(out, "litdata"),
                         chunk_bytes="16MB", num_workers=1, mode="overwrite")
        done["litdata"] = len(items)
    except ImportError as e:
        done["litdata_error"] = str(e)
    try:
        from streaming import MDSWriter

        with MDSWriter(out=os.path.join(out, "mosaic"), columns={"key": "str", "jpg": "bytes"},
                       size_limit=16 << 20) as w:
            n = 0
            for key, data in samples_of(tars):
                w.write({"key": key, "jpg": data})
                n += 1
        done["mosaic"] = n
    except ImportError as e:
        done["mosaic_error"] = str(e)
    return done


def open_litdata(where: str, endpoint: str, cache: str, batch: int, workers: int):
    """A function that builds LitData's StreamingDataset (and, with workers, its StreamingDataLoader)."""
    from litdata import StreamingDataLoader, StreamingDataset

    options = {"endpoint_url": endpoint, "aws_access_key_id": KEY, "aws_secret_access_key": SECRET} \
        if endpoint else {}
    os.environ["DISABLE_S5CMD"] = "1"
    if endpoint.startswith("http://"):  # its obstore client refuses plain http; real stores speak https
        from litdata.streaming import downloader

        options_of = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
        if isinstance(options_of, dict):
            options_of["allow_http"] = "true"

    def build():
        ds = StreamingDataset(where, cache_dir=cache if where.startswith("s3://") else None, storage_options=options)
        return StreamingDataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate_lists) \
            if workers else ds
    return build


def collate_lists(items: list[dict]) -> dict:
    """A batch as lists (torch's default collate takes a memoryview, which LitData hands out, for a sequence);
    memoryviews become bytes, which can travel from a worker (ours, with decode=None, copies there too)."""
    return {k: [bytes(x[k]) if isinstance(x[k], memoryview) else x[k] for x in items] for k in items[0]}


def open_mosaic(where: str, endpoint: str, cache: str, batch: int, workers: int):
    """A function that builds Mosaic's StreamingDataset (in a torch DataLoader with workers)."""
    from streaming import StreamingDataset

    if endpoint:
        os.environ["S3_ENDPOINT_URL"] = endpoint
    remote, local = (where, cache) if where.startswith("s3://") else (None, where)

    def build():
        ds = StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=batch)
        if not workers:
            return ds
        from torch.utils.data import DataLoader

        return DataLoader(ds, batch_size=batch, num_workers=workers)
    return build


def measure(reader: str, where: str, endpoint: str, cache: str, batch: int = 64, workers: int = 0) -> dict:
    """One pass, timed from the start of the dataset's construction (stream.py's Pass): samples one by one, or
    batches of `batch` from a loader with `workers` worker processes."""
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION=REGION)
    if reader not in OPENERS:
        raise SystemExit(f"unknown reader {reader}")
    build = OPENERS[reader](where, endpoint, cache, batch, workers)
    p = Pass(batch)
    ds = build()
    p.constructed()
    if workers:
        for b in ds:
            p.take_batch(b["key"], b["jpg"])
    else:
        for item in ds:
            p.take(item["key"], item["jpg"])  # as stream.py's readers: one byte in every 4 KiB read
    return p.result()


OPENERS = {"litdata": open_litdata, "mosaic": open_mosaic}


def quick() -> int:
    """Convert and measure a toy local set with the peers that are installed; the baseline is a plain tar pass."""
    with tempfile.TemporaryDirectory(prefix="stream-peers-") as tmp:
        write_set(Path(tmp) / "set", 32, 4, 2)
        tars = sorted(str(t) for t in (Path(tmp) / "set").glob("*.tar"))
        t0 = time.perf_counter()
        count = sum(touch(data) > 0 for _, data in samples_of(tars))
        rates = {"tar": count / (time.perf_counter() - t0)}
        done = convert(tars, tmp)
        print(f"quick: {count} samples of ~4 KB in {len(tars)} tars, read locally once per reader")
        print(f"  {'tar (baseline)':<16} {rates['tar']:>9,.0f} samples/s")
        for reader in ("litdata", "mosaic"):
            if reader not in done:
                print(f"  {reader:<16} left out: not installed ({done[reader + '_error']})")
                continue
            r = measure(reader, os.path.join(tmp, reader), "", os.path.join(tmp, f"cache-{reader}"), batch=8)
            if not r["samples"] == r["unique"] == count:
                raise SystemExit(f"{reader} read {r['samples']} samples ({r['unique']} distinct) of {count}")
            rates[reader] = r["samples"] / r["seconds"]
            print(f"  {reader:<16} {rates[reader]:>9,.0f} samples/s")
        for reader in ("litdata", "mosaic"):
            print(f"ratio {reader} / tar: " + (f"{rates[reader] / rates['tar']:.2f}" if reader in rates else
                                               "n/a (left out)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=("convert", "measure"), help="what to do (required without --quick)")
    p.add_argument("reader", nargs="?", help="litdata or mosaic (measure)")
    p.add_argument("--tars", help="comma-separated tar shards (convert)")
    p.add_argument("--out", help="output folder (convert)")
    p.add_argument("--where", help="converted folder or s3:// prefix (measure)")
    p.add_argument("--endpoint", default="", help="S3 endpoint URL (measure; default: none, AWS's)")
    p.add_argument("--cache", help="local cache folder (measure)")
    p.add_argument("--batch", type=int, default=64, help="samples counted as the first batch; the loader's batch "
                                                         "(measure; default 64)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers: 0 iterates the dataset in this process (measure; default 0)")
    p.add_argument("--samples", type=int, help=argparse.SUPPRESS)  # stream.py passes it to every reader
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                   help="convert and measure a toy local set in seconds, to check the script runs (default: off)")
    a = p.parse_args(argv)
    if a.quick:
        return quick()
    if a.action is None:
        p.error("an action (convert or measure) or --quick is required")
    if a.action == "convert":
        out = convert(a.tars.split(","), a.out)
        if "litdata" not in out and "mosaic" not in out:
            raise SystemExit("neither litdata nor mosaicml-streaming is installed")
    else:
        out = measure(a.reader, a.where, a.endpoint, a.cache, a.batch, a.workers)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
