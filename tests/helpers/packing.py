"""Helpers for the shard_tools tests: small images and broken files, manifests, CLI runs, local servers."""

from __future__ import annotations

import csv
import functools
import http.server
import io
import os
import struct
import subprocess
import tarfile
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from stream_ssl.testing.servers import MotoServer
from tests.helpers import PYTHON, REPO

TOOLS = REPO / "shard_tools"


def jpeg_bytes(w: int = 24, h: int = 16, seed: int = 0, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth colour field plus noise: compresses like a photo, differs for every seed.
    base = rng.integers(0, 255, size=(1, 1, 3)) + np.linspace(0, 60, w)[None, :, None]
    pixels = np.clip(base + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(w: int = 20, h: int = 20, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 255, size=(h, w, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(w: int, h: int) -> bytes:
    """A tiny, well-formed PNG whose header claims w x h pixels (a decompression bomb's calling card)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(
        b"IEND", b"")


def write_images(root: Path, n: int, prefix: str = "img", seed: int = 0, size=(24, 16)) -> list[str]:
    """n distinct JPEGs under root; returns their paths relative to root."""
    root.mkdir(parents=True, exist_ok=True)
    rels = []
    for i in range(n):
        rel = f"{prefix}{i:04d}.jpg"
        (root / rel).write_bytes(jpeg_bytes(*size, seed=seed * 100003 + i))
        rels.append(rel)
    return rels


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tree(root: Path, hidden: bool = False) -> dict[str, bytes]:
    """{relative path: bytes} of every file under root (hidden files/folders only when asked)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and (hidden or not any(part.startswith(".") for part in rel.split("/"))):
            out[rel] = p.read_bytes()
    return out


def shard_samples(folder: Path) -> list[dict]:
    """Every sample of the shard set's tars in index order: {'__key__': key, ext: bytes}."""
    import json

    index = json.loads((folder / "index.json").read_text())
    samples = []
    for s in index["shards"]:
        with tarfile.open(folder / s["path"]) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if not samples or samples[-1]["__key__"] != key or samples[-1].get("__shard__") != s["path"]:
                    samples.append({"__key__": key, "__shard__": s["path"]})
                samples[-1][ext] = tar.extractfile(m).read()
    return samples


def run_tool(script: str, *args: str, env: dict | None = None, cwd: Path | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full_env.update(env or {})
    return subprocess.run([PYTHON, str(TOOLS / script), *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


@contextmanager
def http_server(root: Path):
    """Serve `root` over HTTP on 127.0.0.1 (random port); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def moto_server():
    """A moto S3 server on 127.0.0.1 (random port), with dummy credentials in the environment for it.

    Yields the endpoint URL. AWS_ENDPOINT_URL points s3fs (and subprocesses) at it."""
    server = MotoServer()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": server.endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield server.endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.close()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]], fmt=tarfile.GNU_FORMAT,
              extra_dirs: bool = False) -> None:
    """A tar the way other tools write them: mtimes, users, directory entries, long-name extensions."""
    with tarfile.open(path, "w", format=fmt) as tar:
        if extra_dirs:
            info = tarfile.TarInfo("somedir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.uname = len(data), 1700000000, "crawler"
                tar.addfile(info, io.BytesIO(data))


def img2dataset_shard(folder: Path, stem: str, keys: list[str], seed: int = 0, fmt=tarfile.GNU_FORMAT,
                      stats: bool = True) -> list[tuple[str, dict[str, bytes]]]:
    """One img2dataset-style shard: KEY.jpg/.txt/.json members, plus STEM_stats.json with the successes."""
    import json

    samples = []
    for i, key in enumerate(keys):
        samples.append((key, {"jpg": jpeg_bytes(seed=seed * 1000 + i), "txt": f"caption {key}".encode(),
                              "json": json.dumps({"key": key, "status": "success"}).encode()}))
    folder.mkdir(parents=True, exist_ok=True)
    write_tar(folder / f"{stem}.tar", samples, fmt, extra_dirs=True)
    if stats:
        (folder / f"{stem}_stats.json").write_text(json.dumps({"count": len(keys) + 2, "successes": len(keys),
                                                                "failed_to_download": 2}))
    return samples
