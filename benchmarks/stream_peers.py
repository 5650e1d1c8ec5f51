"""The peers of benchmarks/stream.py: LitData and MosaicML Streaming, converted from the same tar shards and
timed over one pass. Run by stream.py with the Python given as --peers-python (these packages pin versions
that clash with this project's); prints one JSON line.

    python stream_peers.py convert --tars a.tar,b.tar --out DIR       # DIR/litdata, DIR/mosaic
    python stream_peers.py measure litdata|mosaic --where DIR_OR_S3 [--endpoint URL] --cache DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.stream import touch  # noqa: E402

KEY, SECRET, REGION = "testing-key", "testing-secret-DO-NOT-LOG", "us-east-1"  # tests/helpers/servers.py


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
    if "litdata" not in done and "mosaic" not in done:
        raise SystemExit("neither litdata nor mosaicml-streaming is installed")
    return done


def measure(reader: str, where: str, endpoint: str, cache: str) -> dict:
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION=REGION)
    if reader == "litdata":
        from litdata import StreamingDataset

        options = {"endpoint_url": endpoint, "aws_access_key_id": KEY, "aws_secret_access_key": SECRET} \
            if endpoint else {}
        os.environ["DISABLE_S5CMD"] = "1"
        if endpoint.startswith("http://"):  # its obstore client refuses plain http; real stores speak https
            from litdata.streaming import downloader

            options_of = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
            if isinstance(options_of, dict):
                options_of["allow_http"] = "true"
        ds = StreamingDataset(where, cache_dir=cache if where.startswith("s3://") else None, storage_options=options)
    elif reader == "mosaic":
        from streaming import StreamingDataset

        if endpoint:
            os.environ["S3_ENDPOINT_URL"] = endpoint
        remote, local = (where, cache) if where.startswith("s3://") else (None, where)
        ds = StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=64)
    else:
        raise SystemExit(f"unknown reader {reader}")
    t0, c0 = time.perf_counter(), time.process_time()
    count = nbytes = 0
    for item in ds:
        count += 1
        nbytes += touch(item["jpg"])  # as stream.py's readers: one byte in every 4 KiB read
    return {"samples": count, "bytes": nbytes, **_times(t0, c0)}


def _times(t0: float, c0: float) -> dict:
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("convert", "measure"))
    p.add_argument("reader", nargs="?", help="litdata or mosaic (measure)")
    p.add_argument("--tars", help="comma-separated tar shards (convert)")
    p.add_argument("--out", help="output folder (convert)")
    p.add_argument("--where", help="converted folder or s3:// prefix (measure)")
    p.add_argument("--endpoint", default="", help="S3 endpoint URL (measure)")
    p.add_argument("--cache", help="local cache folder (measure)")
    a = p.parse_args()
    if a.action == "convert":
        out = convert(a.tars.split(","), a.out)
    else:
        out = measure(a.reader, a.where, a.endpoint, a.cache)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
