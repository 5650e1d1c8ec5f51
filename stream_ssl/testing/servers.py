"""Loopback servers for storage tests: a moto S3 server (subprocess), a fault-injecting TCP proxy and a small
HTTP server with range requests. Everything binds 127.0.0.1; nothing reaches the network."""

from __future__ import annotations

import http.server
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import s3fs

KEY, SECRET, REGION = "testing-key", "testing-secret-DO-NOT-LOG", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    """Poll until something accepts connections on the port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class MotoServer:
    def __init__(self):
        binary = Path(sys.executable).with_name("moto_server")
        if not binary.exists():
            raise RuntimeError(f"{binary} not found: install the test extras (pip install -e '.[test]')")
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        # The server logs every request on stderr: a file, never an unread pipe (a full pipe stalls the server).
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        try:
            wait_for_port(self.port, self.proc)
        except Exception:
            self.close()
            raise
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def options(self, endpoint: str | None = None, **extra) -> dict:
        """Per-protocol storage options that point s3fs at this server (or at `endpoint`, e.g. a proxy)."""
        return {"s3": {"key": KEY, "secret": SECRET,
                       "client_kwargs": {"endpoint_url": endpoint or self.endpoint, "region_name": REGION},
                       **extra}}

    def close(self) -> None:
        stop_server(self.proc, self.log)
        # fsspec caches filesystems by their options; one made from environment variables alone would keep
        # pointing at this (now dead) server in later tests.
        s3fs.S3FileSystem.clear_instance_cache()


def stop_server(proc: subprocess.Popen, log) -> None:
    """End a server process (SIGTERM, then SIGKILL after 10 s) and close the file its log went to."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def upload_folder(fs, local: Path, url: str) -> None:
    """Copy a shard-set folder to `url` with `index.json` last, as the contract asks."""
    files = sorted(p for p in Path(local).iterdir() if p.is_file())
    for p in sorted(files, key=lambda p: p.name == "index.json"):
        fs.pipe_file(url.rstrip("/") + "/" + p.name, p.read_bytes())


class FaultProxy:
    """A TCP proxy in front of a server that misbehaves on chosen connections, and can look like a real object
    store: `latency` seconds added to the time to first byte of every request, responses paced to `rate`
    bytes/s per connection.

    `schedule(i)` gives the action for the i-th accepted connection:
      None          forward everything;
      ("cut", n)    forward, but reset both sides once n response bytes have passed (mid-transfer);
      ("reset",)    reset the connection as soon as the client sends a request;
      ("503",)      answer the first request with `503 SlowDown` and close.
    Faults by request (requests are numbered from 1 in arrival order, over all connections):
      `slowdown`    request numbers answered with `503 SlowDown` (the connection is then closed);
      `outage`      (n, t): at request n, reset every open connection and refuse new ones for t seconds (nothing
                    listens on the port: "connection refused"), then accept again.
    Counts connections, requests, response bytes and faults. Threads only; `close()` stops it.
    `records` holds one dict per HTTP request seen (a recv that starts with a request line): `method`, `path` (with
    its query, as sent), `start` (when the proxy got it, before the latency), `first` and `end` (the first and the
    last response byte passed on, None when none came), `bytes` (response bytes, headers included); times are
    `time.perf_counter()`, which on Linux is CLOCK_MONOTONIC and so comparable with other processes' clocks.
    """

    def __init__(self, upstream_port: int, schedule=lambda i: None, latency: float = 0.0, rate: float | None = None,
                 slowdown=(), outage: tuple[int, float] | None = None):
        self.upstream_port, self.schedule = upstream_port, schedule
        self.latency, self.rate = latency, rate
        self.slowdown, self.outage_at = set(slowdown), outage
        self.requests = 0
        self.listening = threading.Event()
        self.listening.set()
        self.listener = self._listen(0)
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.connections = self.bytes_down = self.faults = 0
        self.kinds: dict[str, int] = {}
        self.records: list[dict] = []
        self.closed = False
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        return listener

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                self.listening.wait()  # an outage closed the listener: wait for the next one (or for close)
                continue
            with self.lock:
                index = self.connections
                self.connections += 1
                self.sockets.append(client)
            threading.Thread(target=self._serve, args=(client, self.schedule(index)), daemon=True).start()

    @staticmethod
    def _reset(*socks: socket.socket) -> None:
        """Abort with a TCP reset. shutdown(SHUT_RD) first wakes a thread blocked reading the socket: closing
        a socket another thread still reads would not release it (and send nothing)."""
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def _fault(self, kind: str) -> None:
        with self.lock:
            self.faults += 1
            self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def outage(self, seconds: float) -> None:
        """Reset every open connection and refuse new ones for `seconds`, then listen on the same port again."""
        self._fault("outage")
        self.listening.clear()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            open_sockets = list(self.sockets)
        self._reset(*open_sockets)
        time.sleep(seconds)
        if not self.closed:
            self.listener = self._listen(self.port)
        self.listening.set()

    @staticmethod
    def _slow_down(client: socket.socket, request: bytes) -> None:
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                       + (b"" if request.startswith(b"HEAD") else body))

    def _serve(self, client: socket.socket, action) -> None:
        """One client connection: refused (`reset`, `503`), or passed to the server and back (cut after
        `action[1]` bytes when it is `cut`), with the store's latency and pacing."""
        if action and action[0] in ("reset", "503"):
            self._refuse(client, action[0])
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            self._reset(client)
            return
        done = threading.Event()
        pace = {"t0": time.perf_counter(), "sent": 0}  # the response being paced: its start and bytes sent
        threading.Thread(target=self._requests, args=(client, upstream, done, pace), daemon=True).start()
        faulted = self._responses(client, upstream, action[1] if action else None, pace)
        done.set()
        if faulted:
            self._reset(client, upstream)
        else:  # the server closed: pass that on cleanly, after everything was delivered
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _refuse(self, client: socket.socket, kind: str) -> None:
        try:
            request = client.recv(65536)
            if kind == "503":
                self._slow_down(client, request)
                client.close()
            else:
                self._reset(client)
        except OSError:
            pass
        self._fault(kind)

    def _requests(self, client: socket.socket, upstream: socket.socket, done: threading.Event, pace: dict) -> None:
        """Client to server: each request counted, delayed by the latency, or answered 503 here (`slowdown`)."""
        try:
            while not done.is_set():
                data = client.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.requests += 1
                    number = self.requests
                record = self._record(data)
                if self.outage_at and number == self.outage_at[0]:
                    threading.Thread(target=self.outage, args=(self.outage_at[1],), daemon=True).start()
                if number in self.slowdown:  # answered here; the server never sees it
                    self._slow_down(client, data)
                    self._fault("503")
                    upstream.shutdown(socket.SHUT_RDWR)
                    break
                if self.latency:
                    time.sleep(self.latency)  # the store "thinks" before the first byte of its answer
                pace.update(t0=time.perf_counter(), sent=0)
                if record is not None:
                    pace["record"] = record
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            try:
                upstream.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _record(self, data: bytes) -> dict | None:
        """A record of the request that `data` starts, appended to `records`; None when `data` continues a body."""
        parts = data[: data.find(b"\r\n")].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return None
        record = {"method": parts[0].decode("latin-1"), "path": parts[1].decode("latin-1"),
                  "start": time.perf_counter(), "first": None, "end": None, "bytes": 0}
        self.records.append(record)  # list.append is atomic: no lock
        return record

    def _responses(self, client: socket.socket, upstream: socket.socket, budget: int | None, pace: dict) -> bool:
        """Server to client, paced to `rate`; cut after `budget` bytes (returns True when it cut)."""
        passed = 0
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    return False
                if budget is not None and passed + len(data) >= budget:
                    client.sendall(data[: max(0, budget - passed)])
                    self._fault("cut")
                    return True
                record, now = pace.get("record"), time.perf_counter()  # taken before the client can ask again
                client.sendall(data)
                passed += len(data)
                if record is not None:
                    if record["first"] is None:
                        record["first"] = now
                    record["end"] = time.perf_counter()
                    record["bytes"] += len(data)
                with self.lock:
                    self.bytes_down += len(data)
                if self.rate:
                    pace["sent"] += len(data)
                    ahead = pace["t0"] + pace["sent"] / self.rate - time.perf_counter()
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            return False

    def close(self) -> None:
        self.closed = True
        self.listening.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self.lock:
            for s in self.sockets:
                self._reset(s)


def fault_schedule(seed: int, every: int = 2, max_faults: int = 40, cut_range=(64, 6000)):
    """Every `every`-th connection misbehaves (mostly cuts mid-transfer, some resets and 503s), up to
    `max_faults`; the rest pass."""
    rng = random.Random(seed)
    plan = []
    for i in range(max_faults * every):
        if i % every:
            plan.append(None)
            continue
        kind = rng.random()
        if kind < 0.8:
            plan.append(("cut", rng.randint(*cut_range)))
        elif kind < 0.9:
            plan.append(("reset",))
        else:
            plan.append(("503",))
    return lambda i: plan[i] if i < len(plan) else None


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single `Range: bytes=a-b` support (the stdlib handler has none)."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "") or "")
        path = self.translate_path(self.path)
        if not m or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start = int(m.group(1))
        end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
        if start >= size:
            self.send_error(416)
            return None
        f = open(path, "rb")
        f.seek(start)
        count = getattr(self.server, "count_ranged", None)
        if count is not None:
            count(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = end - start + 1
        return _Limited(f, end - start + 1)


class _Limited:
    def __init__(self, f, n: int):
        self.f, self.n = f, n

    def read(self, size: int = -1) -> bytes:
        if self.n <= 0:
            return b""
        data = self.f.read(self.n if size < 0 else min(size, self.n))
        self.n -= len(data)
        return data

    def close(self) -> None:
        self.f.close()


class HttpServer:
    """Serves `root` on 127.0.0.1 with range requests; `ranged_bytes` counts the bytes of ranged answers (shard
    reads; whole-file reads such as .idx and index.json are not counted)."""

    def __init__(self, root: Path):
        handler = lambda *a, **k: RangeHandler(*a, directory=str(root), **k)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.ranged_bytes = 0
        self._lock = threading.Lock()
        self.server.count_ranged = self._count
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _count(self, n: int) -> None:
        with self._lock:
            self.ranged_bytes += n

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def s3_client_error(code: str, status: int, operation: str = "GetObject") -> Exception:
    """A botocore ClientError as s3fs raises it: translated to a Python error, the ClientError as its cause."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = ClientError({"Error": {"Code": code, "Message": f"message of {code}"},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, operation)
    return translate_boto_error(error)
