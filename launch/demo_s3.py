"""Training from object storage, next to the same run from local disk: `make demo-s3`.

Starts an S3 server on 127.0.0.1 (moto, from the test extras), renders a small labeled image pool, packs it
twice with the same seed (to a local folder and straight to `s3://demo/pool`: the two shard sets are
byte-identical), then trains the same short SimCLR run twice: from the local folder, and from `s3://` through a
proxy that makes the loopback server behave like a remote object store (30 ms before the first byte of every
answer, 40 MB/s per connection), with `--cache-dir`, so that after the first pass over the pool the reads come
from local disk. Prints the reader's figures of the two runs side by side (from each run's summary.json:
`storage`, `object_store`): read rate, requests, bytes read from storage, cache hits, time to first byte, and
whether the two runs' losses are identical (same plan, same seed, same samples: they should be).

    make demo-s3                                  # about 2 minutes on 2 cores
    python launch/demo_s3.py --out demo_s3_out --pool 2000 --passes 4

Everything binds 127.0.0.1; the server and the proxy stop when the script ends (also on Ctrl-C). The run
folders stay under --out (OUT/runs/local, OUT/runs/s3, the cache in OUT/cache). See docs/storage.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUCKET = "demo"
MARKER = ".demo-s3"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_s3_out"),
                   help="folder for the data, both runs and the cache; emptied first if an earlier run of "
                        "this script made it (default: demo_s3_out)")
    p.add_argument("--pool", type=int, default=1600, help="images in the pool, all of them unique samples N "
                                                          "(default: 1600)")
    p.add_argument("--passes", type=int, default=4, help="passes over the pool: budget C = passes x N (default: 4)")
    p.add_argument("--shard-size", type=int, default=200, help="samples per shard (default: 200)")
    p.add_argument("--render-size", type=int, default=64, help="side of the rendered images in pixels (default: 64)")
    p.add_argument("--backbone", default="resnet10t", help="timm backbone (default: resnet10t)")
    p.add_argument("--backbone-options", default='{"channels": [16, 32, 64, 128]}',
                   help="JSON, to timm (default: a narrow ResNet-10, channels 16-32-64-128)")
    p.add_argument("--image-size", type=int, default=24, help="side of the training views (default: 24)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--latency-ms", type=float, default=30.0,
                   help="time the proxy adds before the first byte of every answer (default: 30)")
    p.add_argument("--rate-mbps", type=float, default=40.0,
                   help="MB/s the proxy lets through per connection (default: 40)")
    p.add_argument("--read-ahead-bytes", default="256KiB",
                   help="the trainer's --read-ahead-bytes: small here, so that later passes over this small pool "
                        "are read after the first pass has filled the cache (default: 256KiB)")
    p.add_argument("--workers", type=int, default=1, help="data-loader workers of each run (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the plan and the runs (default: 0)")
    return p


def make_data(a: argparse.Namespace, options: dict) -> tuple[Path, str]:
    """Render the pool and pack it to OUT/pool and to s3://demo/pool (same manifest, same seed)."""
    from shard_tools.pack import pack
    from shard_tools.storage import filesystem
    from shard_tools.synth import synthesize

    manifest = synthesize(a.out / "images", a.pool, classes=10, size=a.render_size, domain="a", seed=a.seed)
    local, url = a.out / "pool", f"s3://{BUCKET}/pool"
    filesystem(url, options).call_s3("create_bucket", Bucket=BUCKET)
    packed = [pack(manifest, out, name="pool", shard_size=a.shard_size, seed=a.seed, source="generated",
                   progress=False, storage_options=so).index for out, so in ((str(local), None), (url, options))]
    if packed[0]["shards"] != packed[1]["shards"]:
        raise RuntimeError(f"{local} and {url} hold different shards (sha256 in index.json)")
    return local, url


def train(a: argparse.Namespace, data: str, out: Path, extra: list[str]) -> dict:
    """One run of stream_ssl/train.py in its own process; returns its summary.json."""
    args = {"data": data, "out": out, "method": "simclr", "backbone": a.backbone,
            "backbone-options": a.backbone_options, "image-size": a.image_size, "batch-size": a.batch_size,
            "unique-samples": a.pool, "budget-samples": a.passes * a.pool, "num-workers": a.workers,
            "optimizer": "sgd", "lr": 1.0, "weight-decay": 5e-4, "warmup-fraction": 0.1, "seed": a.seed,
            "method-options": json.dumps({"proj_hidden": 128, "proj_dim": 64, "temperature": 0.2}),
            "read-ahead-bytes": a.read_ahead_bytes, "log-every": 10, "log-with": "none"}
    cmd = [sys.executable, str(REPO / "stream_ssl" / "train.py"), "--no-progress"]
    cmd += [x for k, v in args.items() for x in (f"--{k}", str(v))] + extra
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no message)"]
        reason = next((line for line in reversed(lines) if line.startswith("error: ")), lines[-1])
        raise RuntimeError(f"training from {data} failed (exit status {done.returncode}): {reason}")
    return json.loads((out / "summary.json").read_text())


def prepare_out(out: Path) -> None:
    """An empty `out`: a folder this script made before (it holds MARKER) is emptied; any other folder that is
    not empty is refused, never deleted."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise ValueError(f"--out {out} is not empty and was not made by this demo; choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by launch/demo_s3.py; emptied by its next run\n")


def demo(a: argparse.Namespace) -> dict:
    """Data, a server, a proxy and the two runs; returns {"local": summary, "s3": summary, "proxy": counts,
    "server": its endpoint}. The server and the proxy are stopped before it returns or raises."""
    from stream_ssl.testing.servers import FaultProxy, MotoServer

    prepare_out(a.out)
    server = proxy = None
    try:
        t0 = time.perf_counter()
        server = MotoServer()
        print(f"[demo-s3] S3 server (moto) on {server.endpoint}; rendering and packing {a.pool} images ...",
              flush=True)
        local, url = make_data(a, server.options())
        print(f"[demo-s3] data ready in {time.perf_counter() - t0:.0f} s: {local} and {url}", flush=True)
        runs = {}
        print(f"[demo-s3] training from {local} ...", flush=True)
        runs["local"] = train(a, str(local), a.out / "runs" / "local", [])
        proxy = FaultProxy(server.port, latency=a.latency_ms / 1e3, rate=a.rate_mbps * 1e6)
        options = a.out / "s3-options.json"  # credentials in a file of the user's only, not on a command line
        options.touch(mode=0o600)
        options.write_text(json.dumps(server.options(proxy.endpoint)))
        print(f"[demo-s3] training from {url} through the proxy {proxy.endpoint} ...", flush=True)
        runs["s3"] = train(a, url, a.out / "runs" / "s3", ["--storage-options", str(options),
                                                           "--cache-dir", str(a.out / "cache")])
        runs["proxy"] = {"requests": proxy.requests, "bytes": proxy.bytes_down}
        runs["server"] = {"endpoint": server.endpoint, "port": server.port}
        return runs
    finally:
        if proxy is not None:
            proxy.close()
        if server is not None:
            server.close()


# (label, the figure from a run's summary.json (`storage`: the reader's counts over the run), its format)
FIGURES = (
    ("steps", lambda r: r["steps"], ","),
    ("final loss", lambda r: r["final_loss"], ".4f"),
    ("wall seconds", lambda r: r["wall_seconds"], ".1f"),
    ("samples/s", lambda r: r["samples_per_s"], ",.0f"),
    ("time waiting for data", lambda r: r["data_wait"], ".1%"),
    ("read rate from storage (MB/s)", lambda r: r["storage"]["read_MBps"], ".2f"),
    ("requests", lambda r: r["storage"]["requests"], ","),
    ("MB read from storage", lambda r: r["storage"]["bytes_read"] / 1e6, ".2f"),
    ("mean time to first byte (ms)", lambda r: r["storage"]["ttfb_ms"], ".1f"),
    ("retries", lambda r: r["storage"]["retries"], ","),
    ("cache hits", lambda r: r["storage"]["cache_hits"], ","),
    ("MB served by the cache", lambda r: r["storage"]["cache_bytes"] / 1e6, ".2f"),
    (".idx files fetched", lambda r: r["storage"]["index_fetches"], ","),
)


def table(runs: dict, a: argparse.Namespace) -> str:
    """The FIGURES of the local and the S3 run, side by side."""
    rows = [("", "local disk", f"s3:// ({a.latency_ms:g} ms, {a.rate_mbps:g} MB/s)")]
    rows += [(label, format(get(runs["local"]), spec), format(get(runs["s3"]), spec)) for label, get, spec in FIGURES]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows)


def report(runs: dict, a: argparse.Namespace) -> str:
    local, s3 = runs["local"], runs["s3"]
    same = local["losses"] == s3["losses"]
    store = s3["object_store"]
    lines = [
        f"SimCLR, {a.backbone} at {a.image_size} px, batch {a.batch_size}: {a.passes} passes over {a.pool} images "
        f"({local['steps']} steps), once from local disk and once from s3:// with --cache-dir.",
        table(runs, a),
        f"From s3://, the store sent {store['object_store_bytes_read'] / 1e6:.2f} MB of samples (the plan expected "
        f"{store['object_store_bytes'] / 1e6:.2f} MB: the pool once, later passes from the cache); the proxy counted "
        f"{runs['proxy']['requests']} requests and {runs['proxy']['bytes'] / 1e6:.2f} MB with headers, .idx files "
        "and index.json.",
        "Losses at every logged step: " + ("identical (same plan, same samples, same seed)." if same else
                                           "DIFFERENT: " + json.dumps({"local": local["losses"][-3:],
                                                                       "s3": s3["losses"][-3:]})),
    ]
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # (so that `finally` stops the server)
    t0 = time.perf_counter()
    try:
        runs = demo(a)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()
    print(report(runs, a))
    print(f"\n[demo-s3] done in {(time.perf_counter() - t0) / 60:.1f} min; runs in {a.out / 'runs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
