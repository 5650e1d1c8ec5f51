"""The disk fills up: a training run whose checkpoint does not fit, and a pack whose shard does not fit, on a real
size-limited file system (a tmpfs mounted in a private user namespace: the kernel answers ENOSPC). Each stops
with one line naming the file; what was complete before stays intact, and once there is room the same command
finishes as if nothing had happened."""

from __future__ import annotations

import pytest
import torch

from shard_tools.pack import pack
from stream_ssl import checkpoint
from tests.helpers import PYTHON
from tests.helpers.fault_runs import compare_keys, on_small_disk, small_disks, train, train_command
from tests.helpers.packing import tree

pytestmark = [pytest.mark.faults, pytest.mark.multiprocess]


@pytest.fixture(autouse=True)
def tmpfs_here():
    why = small_disks()
    if why:
        pytest.skip(f"a size-limited tmpfs needs unprivileged user namespaces: {why}")


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:") or "Traceback" in ln]


def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one(pool, local_run, tmp_path, fault_row):
    """5 MB: config, metrics, keys and the step-4 checkpoint (3.2 MB) fit, the step-8 one does not."""
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    flags = dict(num_workers=0, save_every=4, keep_checkpoints=0)
    full = on_small_disk("5m", disk, kept, train_command(pool, disk / "run", **flags))
    errors = _errors(full.stderr)
    folder = kept / "run" / "checkpoints"
    latest = checkpoint.latest_checkpoint(kept / "run")
    assert full.returncode == 1 and len(errors) == 1, full.stderr[-3000:]
    assert f"could not write checkpoint {disk / 'run/checkpoints/step-00000008.pt'}: No space left on device" \
        in errors[0] and "step-00000004.pt, is intact" in errors[0]
    assert latest.name == "step-00000004.pt" and checkpoint.load_checkpoint(latest)["step"] == 4
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-00000004.pt"]  # no partial file left
    resumed = train(pool, kept / "run", **flags)  # the same run, where there is room
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trained, lost, dup = compare_keys(resumed, local_run)
    a, b = (checkpoint.load_checkpoint(r.out / "checkpoints/step-00000015.pt")["model"] for r in (resumed, local_run))
    equal = all(torch.equal(a[k], b[k]) for k in a)
    fault_row("disk full while a checkpoint is written (tmpfs of 5 MB)", lost, dup, exit_status=full.returncode,
              error_lines=len(errors), kept=f"{latest.name} (loads)", partial_files=0,
              after_making_room=f"resumed at step 4, final weights {'equal to' if equal else 'DIFFERENT from'} "
                                "the straight run")
    assert equal


def test_a_shard_that_does_not_fit_keeps_the_shards_before_it(pool, tmp_path, fault_row):
    """600 KB: four shards of ~125 KB (with their .idx) fit, the fifth does not."""
    manifest = pool.parent / "images" / "manifest.csv"
    disk, kept, clean = tmp_path / "disk", tmp_path / "kept", tmp_path / "clean"
    args = ["--name", "set", "--shard-size", "30", "--seed", "11", "--no-progress"]
    full = on_small_disk("600k", disk, kept, [PYTHON, "-m", "shard_tools.pack", manifest, "--out", disk / "set", *args])
    errors = _errors(full.stderr)
    pack(manifest, clean, name="set", shard_size=30, seed=11)
    reference = tree(clean)
    left = tree(kept / "set")
    shards = sorted(n for n in left if n.endswith(".tar"))
    assert full.returncode == 1 and len(errors) == 1, full.stderr[-3000:]
    assert f"could not write shard {disk / 'set/set-000004.tar'}: No space left on device" in errors[0]
    assert shards == [f"set-00000{i}.tar" for i in range(4)] and "index.json" not in left
    assert all(left[n] == reference[n] for n in left if n.endswith((".tar", ".idx")))  # complete, byte for byte
    assert not any(n.endswith(".tmp") for n in left)
    rerun = pack(manifest, kept / "set", name="set", shard_size=30, seed=11)  # the same command, with room
    final = tree(kept / "set")
    fault_row("disk full while a shard is written (pack, tmpfs of 600 KB)", 0, 0, exit_status=full.returncode,
              error_lines=len(errors), shards_kept=f"{len(shards)} (byte-identical)", partial_files=0,
              after_making_room=f"resumed after {rerun.resumed_shards} shards, output "
                                f"{'byte-identical' if final == reference else 'DIFFERENT'}")
    assert rerun.resumed_shards == 4 and final == reference
