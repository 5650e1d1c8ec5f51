"""A small image web server on 127.0.0.1 for the crawl tests: good, missing, slow, corrupt and disallowed URLs.

    /img/I.jpg       200, the procedural image I (shard_tools.synth.render, label I % CLASSES)
    /slow/I.jpg      the same after SLOW_SECONDS
    /missing/I.jpg   404
    /corrupt/I.jpg   200 with bytes that are not an image
    /noai/I.jpg      200, the image, with `X-Robots-Tag: noai` (img2dataset skips these by default)

Every request is counted by path (`server.requests`), so tests can check what a re-run downloads again.
"""

from __future__ import annotations

import collections
import http.server
import io
import threading
import time
from contextlib import contextmanager

from shard_tools.synth import class_names, render

CLASSES = 4
SIZE = 24
SLOW_SECONDS = 0.2
NAMES = class_names(CLASSES)


def image_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    render(i, i % CLASSES, SIZE, "a", 0).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    counter: collections.Counter
    lock: threading.Lock

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        with self.lock:
            self.counter[self.path] += 1
        kind, _, file = self.path.strip("/").partition("/")
        try:
            i = int(file.split(".")[0])
        except ValueError:
            self.send_error(400)
            return
        headers = {"Content-Type": "image/jpeg"}
        if kind == "missing":
            self.send_error(404)
            return
        if kind == "corrupt":
            body = b"<html>this is not an image</html>" * 8
        else:
            if kind == "slow":
                time.sleep(SLOW_SECONDS)
            elif kind == "noai":
                headers["X-Robots-Tag"] = "noai"
            elif kind != "img":
                self.send_error(404)
                return
            body = image_bytes(i)
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ImageServer:
    def __init__(self):
        handler = type("Handler", (_Handler,), {"counter": collections.Counter(), "lock": threading.Lock()})
        self.handler = handler
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def requests(self) -> collections.Counter:
        return self.handler.counter

    def reset(self) -> None:
        with self.handler.lock:
            self.handler.counter.clear()


@contextmanager
def image_server():
    """A running ImageServer (random port); shut down on exit."""
    server = ImageServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
