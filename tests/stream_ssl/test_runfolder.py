"""A run folder on object storage (stream_ssl/runfolder.py): its local mirror is refilled from the URL, and a
local folder that is not that URL's mirror is never emptied."""

from __future__ import annotations

import pytest

from shard_tools.storage import filesystem
from stream_ssl.errors import RunError
from stream_ssl.runfolder import MARKER, RemoteRunFolder, default_mirror

pytestmark = pytest.mark.s3


def test_the_mirror_is_refilled_and_a_foreign_folder_refused(moto, tmp_path):
    options = moto.options()
    filesystem("s3://x", options).call_s3("create_bucket", Bucket="mirrors")
    url = "s3://mirrors/run"
    filesystem(url, options).pipe_file("mirrors/run/config.json", b"{}")
    mine = tmp_path / "mirror"
    RemoteRunFolder(url, mine, options).pull()
    assert (mine / "config.json").read_bytes() == b"{}" and (mine / MARKER).read_text().strip() == url
    (mine / "stale.txt").write_text("left by an earlier run here")
    RemoteRunFolder(url, mine, options).pull()  # its own mirror: emptied and refilled
    assert not (mine / "stale.txt").exists() and (mine / "config.json").exists()
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(RunError, match="not the mirror of s3://mirrors/run"):
        RemoteRunFolder(url, foreign, options).pull()
    assert (foreign / "thesis.tex").read_text() == "precious"
    assert default_mirror(url) != default_mirror("s3://mirrors/other") and default_mirror(url).name.startswith("run-")
