"""`make demo-s3` (launch/demo_s3.py) at a tiny size: a local S3 server, the same run from local disk and from s3://
through the latency proxy with a cache, the figures side by side, and the server gone afterwards."""

from __future__ import annotations

import json
import math
import re
import socket

import pytest

from launch.demo_s3 import MARKER, main

TINY = ["--pool", "96", "--passes", "4", "--shard-size", "24", "--render-size", "32", "--backbone", "test_resnet",
        "--backbone-options", "{}", "--image-size", "32", "--batch-size", "16", "--read-ahead-bytes", "64KiB"]


@pytest.mark.s3
@pytest.mark.multiprocess
def test_the_same_run_from_s3_and_from_local_disk(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    local, s3 = (json.loads((out / "runs" / name / "summary.json").read_text()) for name in ("local", "s3"))
    assert local["steps"] == s3["steps"] == 96 * 4 // 16
    # Same plan, same samples in the same order, same seed: the same losses, to the last bit.
    assert local["losses"] == s3["losses"] and math.isfinite(s3["final_loss"])
    assert "identical (same plan, same samples, same seed)" in printed
    store, disk = s3["storage"], local["storage"]
    assert store["bytes_read"] > 0 and store["requests"] > 0 and store["ttfb_ms"] > 0
    assert store["cache_hits"] > 0 and disk["cache_hits"] == 0  # later passes came from the cache
    # 4 passes from local disk; from s3:// about one (the pool, then the cache)
    assert disk["bytes_read"] / 4 <= s3["object_store"]["object_store_bytes_read"] == store["bytes_read"]
    assert store["bytes_read"] < disk["bytes_read"] / 2
    rows = dict(re.findall(r"^(requests|cache hits) +\S+ +(\S+)$", printed, re.MULTILINE))
    assert rows == {"requests": f"{store['requests']:,}", "cache hits": f"{store['cache_hits']:,}"}
    port = int(re.search(r"S3 server \(moto\) on http://127\.0\.0\.1:(\d+)", printed).group(1))
    with pytest.raises(OSError):  # the server stopped with the script
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_out_is_emptied_only_when_the_demo_made_it(tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["--out", str(other)]) == 1
    assert "is not empty and was not made by this demo" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine" and not (other / MARKER).exists()
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "(default: demo_s3_out)" in capsys.readouterr().out
