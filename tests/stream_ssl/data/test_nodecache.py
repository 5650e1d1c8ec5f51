"""The node cache: which node a process is on, the expected object-store bytes, one fetch per node for every
range (claims, the filler), damaged entries fetched again and never used, a full disk that stops caching only."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from shard_tools.shardset import load_shard_set
from stream_ssl.data import cache as cache_module
from stream_ssl.data.cache import BUSY, CLAIM_TTL, HELD, MISSING, DiskCache
from stream_ssl.data.nodecache import CacheShare, Node, NodeFiller, ReaderWaits, node_from_env, storage_summary
from stream_ssl.data.plan import make_plan
from stream_ssl.data.readahead import ReadAhead
from stream_ssl.data.reader import ShardReader
from stream_ssl.plan import main as plan_main
from stream_ssl.testing.servers import HttpServer
from tests.helpers.plans import fake_set

KEY = "k" * 40


@pytest.fixture(scope="module")
def folder(make_shard_set):
    return make_shard_set(240, shard_size=30, seed=5)


@pytest.fixture(scope="module")
def shards(folder):
    return load_shard_set(str(folder))


def _reader(plan, cache_dir=None, **kw):
    cache = DiskCache(cache_dir, 64 << 20) if cache_dir else None
    return ShardReader(plan.sets, cache=cache, plan=plan, cache_local=True, **kw)


def _sample_bytes(plan, samples) -> int:
    """Bytes of the given (source, shard, index) samples in their shards (what reading them costs)."""
    reader = ShardReader(plan.sets)
    return sum(int(np.diff(reader.boundaries(s, h)[[i, i + 1]])[0]) for s, h, i in samples)


def _reads(plan, ranks) -> set:
    return {x for step in range(plan.steps) for r in ranks for x in plan.rank_samples(step, r)}


# ----------------------------------------------------------------------------------------------------------
# Which node, and what the run will read.


def test_node_identity_comes_from_the_launcher_environment():
    torchrun = {"WORLD_SIZE": "16", "RANK": "11", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1",
                "GROUP_WORLD_SIZE": "2"}
    assert node_from_env(torchrun) == Node(rank=1, nodes=2, local_rank=3, local_world_size=8)
    del torchrun["GROUP_RANK"], torchrun["GROUP_WORLD_SIZE"]  # from RANK and LOCAL_WORLD_SIZE
    assert node_from_env(torchrun) == Node(1, 2, 3, 8)
    slurm = {"WORLD_SIZE": "8", "SLURM_NODEID": "3", "SLURM_NNODES": "4", "SLURM_LOCALID": "1",
             "SLURM_NTASKS_PER_NODE": "2(x4)"}
    assert node_from_env(slurm) == Node(3, 4, 1, 2)
    # A single process is one node, whatever the allocation around it says.
    assert node_from_env({}) == node_from_env({"SLURM_NNODES": "4", "SLURM_NODEID": "2"}) == Node(0, 1, 0, 1)
    # Simulated nodes (tests, benchmarks): every process its own node.
    simulated = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "1"}
    assert node_from_env(simulated) == Node(1, 2, 0, 1)
    with pytest.raises(ValueError, match="GROUP_RANK"):
        node_from_env({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "2"})
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='x' is not a number"):
        node_from_env({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "x"})


@pytest.mark.parametrize("nodes,budget,reach", [
    (1, 400, 1.0),  # one node: the pool once, however many passes
    (2, 400, 2 * (1 - 0.5 ** 4)),  # 4 passes, 2 nodes: 1.875 pools
    (4, 200, 4 * (1 - 0.75 ** 2)),  # 2 passes, 4 nodes: 1.75 pools, less than min(E, K) = 2
    (2, 240, 2 * (1 - 0.5 * 0.5 * 0.8)),  # 2.4 passes: the partial pass deals 0.4 of the pool
    (8, 48, 0.48),  # half a pass: nothing repeats, nothing is cached
])
def test_expected_object_store_bytes_known_answers(nodes, budget, reach):
    plan = make_plan([fake_set([50] * 2)], 100, budget, world_size=8, batch_size=1)
    pool = plan.summary()["pool_bytes"]
    s = storage_summary(plan, nodes, 1 << 30)
    assert s["object_store_bytes"] == pytest.approx(reach * pool, abs=1)
    assert s["object_store_bytes"] <= min(plan.passes, nodes) * pool + 1
    assert s["object_store_bytes_without_cache"] == pytest.approx(plan.passes * pool, abs=1)
    assert s["cache_policy"] == ("whole pool" if plan.last_pass > 0 else "none")
    assert s["processes_per_node"] == 8 // nodes
    none = storage_summary(plan, nodes)
    assert none["cache_policy"] == "none" and none["object_store_bytes"] == none["object_store_bytes_without_cache"]


def test_a_pool_larger_than_the_cache_keeps_a_fixed_share():
    plan = make_plan([fake_set([50] * 4)], 200, 800, world_size=2, batch_size=4)  # 4 passes, 4 units
    unit = plan.pool_unit_bytes()[0] + 128 * 50  # a unit's bytes and the room for its .idx
    share = CacheShare.of(plan, int(2.5 * unit / 0.95))  # room for two units and a half: two
    assert len(share.shards) == 2 and share.fraction == pytest.approx(0.5)
    kept = {(int(a), int(b)) for a, b in zip(plan.unit_source[:2], plan.unit_shard[:2])}
    assert share.shards == kept and all(share(*k) for k in kept)
    s = storage_summary(plan, 2, int(2.5 * unit / 0.95))
    pool = plan.summary()["pool_bytes"]
    # kept half: read once per node that deals it (1.875 pools for 2 nodes, 4 passes); the other half: 4 times
    assert s["cache_policy"] == "share" and s["object_store_bytes"] == pytest.approx((0.5 * 1.875 + 0.5 * 4) * pool)
    assert CacheShare.of(plan, 10**9).fraction == 1.0 and CacheShare.of(plan, 1000).shards == frozenset()


def test_the_estimate_matches_the_union_of_what_each_node_reads():
    """Each pass deals a node 1/K of the pool; the estimate assumes the passes deal independently. Counted
    exactly over a plan (every rank, every step): within 3%."""
    plan = make_plan([fake_set([40] * 200)], 8000, 24000, world_size=8, batch_size=8, seed=2)  # 3 passes
    nodes = 4
    ranks = plan.world_size // nodes
    union = sum(len(_reads(plan, range(n * ranks, (n + 1) * ranks))) for n in range(nodes))
    expected = nodes * (1 - (1 - 1 / nodes) ** 3)
    assert union / 8000 == pytest.approx(expected, rel=0.03)
    s = storage_summary(plan, nodes, 1 << 30)
    assert s["object_store_bytes"] / plan.summary()["pool_bytes"] == pytest.approx(expected, rel=1e-6)


def test_plan_cli_reports_object_store_bytes_for_nodes_and_cache(folder, capsys):
    args = ["--data", str(folder), "--unique-samples", "120", "--budget-samples", "480", "--world-size", "4",
            "--batch-size", "4"]
    assert plan_main([*args, "--nodes", "2", "--cache-size", "10MB", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["nodes"] == 2 and s["processes_per_node"] == 2 and s["cache_bytes_per_node"] == 10**7
    assert s["cache_policy"] == "whole pool"
    assert s["object_store_bytes"] == pytest.approx(1.875 * s["pool_bytes"], rel=1e-6)
    assert plan_main([*args, "--nodes", "2"]) == 0
    assert "storage: ~" in capsys.readouterr().out
    assert plan_main([*args, "--nodes", "3"]) == 2
    assert "--world-size 4 is not a multiple of --nodes 3" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# The cache folder: claims, checks.


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_claims_give_each_range_to_one_process_and_die_with_it(tmp_path):
    a, b = DiskCache(tmp_path, 1 << 20), DiskCache(tmp_path, 1 << 20)  # two processes of a node
    assert a.claim(KEY, [(0, 10), (10, 20)]) == [True, True]
    assert b.claim(KEY, [(5, 15), (20, 30)]) == [False, True]
    assert b.state(KEY, 0, 40) == [(0, 30, BUSY), (30, 40, MISSING)]
    assert a.put(KEY, 0, 10, b"x" * 10)  # the entry replaces the claim
    assert b.state(KEY, 0, 40) == [(0, 10, HELD), (10, 30, BUSY), (30, 40, MISSING)]
    assert b.claim(KEY, [(0, 10)]) == [False]  # held: nothing to fetch
    a.release(KEY, 10, 20)
    b.release(KEY, 20, 30)
    assert a.state(KEY, 0, 40) == [(0, 10, HELD), (10, 40, MISSING)]
    # A claim left by a process that is gone, or too old, is dead: ignored, and cleared by the next claim.
    folder = tmp_path / KEY[:2] / KEY
    (folder / f".claim-{10:010d}-{20:010d}-{_dead_pid()}-{a.token}").touch()
    old = folder / f".claim-{20:010d}-{30:010d}-1-ffffffff0000"  # another host's, an hour old
    old.touch()
    os.utime(old, (0, os.path.getmtime(old) - CLAIM_TTL - 60))
    fresh = folder / f".claim-{30:010d}-{40:010d}-1-ffffffff0000"  # another host's, new: alive
    fresh.touch()
    assert a.state(KEY, 0, 40) == [(0, 10, HELD), (10, 30, MISSING), (30, 40, BUSY)]
    assert b.claim(KEY, [(10, 30)]) == [True] and not old.exists()


def test_waiting_ends_when_the_entry_arrives_or_its_claim_goes(tmp_path):
    a, b = DiskCache(tmp_path, 1 << 20), DiskCache(tmp_path, 1 << 20)
    assert a.claim(KEY, [(0, 10), (10, 20)]) == [True, True]
    result = {}
    waiter = threading.Thread(target=lambda: result.update(got=b.wait(KEY, 0, 10)))
    waiter.start()
    a.put(KEY, 0, 10, b"y" * 10)
    waiter.join()
    assert result["got"] is True
    waiter = threading.Thread(target=lambda: result.update(got=b.wait(KEY, 10, 20)))
    waiter.start()
    a.release(KEY, 10, 20)  # the fetch failed: nobody is bringing it
    waiter.join()
    assert result["got"] is False


def test_damaged_entries_and_blobs_read_as_missing_and_are_removed(tmp_path):
    c = DiskCache(tmp_path, 1 << 20)
    for first in (0, 10, 20):
        assert c.put(KEY, first, first + 10, bytes(range(first, first + 100)))
    flipped, short, good = (p for _, _, p in c.entries(KEY))
    data = bytearray(flipped.read_bytes())
    data[50] ^= 1
    flipped.write_bytes(bytes(data))  # same size, one bit off: only the checksum sees it
    short.write_bytes(short.read_bytes()[:-1])
    fresh = DiskCache(tmp_path, 1 << 20)  # a process that has not checked them yet
    assert fresh.read(flipped, 0, 10, 100) is None and not flipped.exists()
    assert fresh.read(short, 0, 10, 100) is None and not short.exists()
    assert fresh.read(good, 5, 10, 100) == bytes(range(25, 35)) and fresh.rejected == 2
    assert c.put_blob(KEY, "idx", b"v1.2 3\n") and fresh.get_blob(KEY, "idx") == b"v1.2 3\n"
    blob = next(p for p in (tmp_path / KEY[:2] / KEY).iterdir() if p.name.endswith(".blob"))
    blob.write_bytes(b"v1.2 4\n")
    assert fresh.get_blob(KEY, "idx") is None and not blob.exists()


def test_damaged_cache_entries_are_fetched_again_and_never_trained_on(shards, tmp_path):
    plan = make_plan([shards], 120, 240, world_size=1, batch_size=8, seed=1)
    want = [(st, [s["jpg"] for s in ss]) for st, ss in ReadAhead(ShardReader(plan.sets), plan, 0, range(plan.steps))]
    warm = _reader(plan, tmp_path / "c")
    assert [(st, [s["jpg"] for s in ss]) for st, ss in ReadAhead(warm, plan, 0, range(plan.steps))] == want
    warm.close()
    entries = [p for p in (tmp_path / "c").rglob("*.bin")]
    assert len(entries) >= 2
    flipped, short = entries[0], entries[1]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(bytes(data))
    short.write_bytes(short.read_bytes()[:-512])
    damaged = len(data) + short.stat().st_size + 512
    again = _reader(plan, tmp_path / "c")
    assert [(st, [s["jpg"] for s in ss]) for st, ss in ReadAhead(again, plan, 0, range(plan.steps))] == want
    again.close()
    assert again.cache.rejected == 2 and again.stats.bytes_read == damaged  # exactly the two, from storage
    third = _reader(plan, tmp_path / "c")  # ... and stored again, whole
    assert [(st, [s["jpg"] for s in ss]) for st, ss in ReadAhead(third, plan, 0, range(plan.steps))] == want
    assert third.stats.bytes_read == 0 and third.cache.rejected == 0


def test_a_whole_shard_is_checked_against_its_sha256_before_it_is_kept(shards, tmp_path):
    plan = make_plan([shards], 240, 480, batch_size=8)
    reader = _reader(plan, tmp_path / "c")
    n = shards.shards[0].samples
    data = bytes(reader.fetch(shards.shard_url(0), reader.boundaries(0, 0), 0, n))
    bad = data[:100] + bytes([data[100] ^ 1]) + data[101:]
    assert not reader.store(0, 0, 0, n, bad) and reader.stats.cache_rejected == 1
    assert reader.cache.entries(reader.shard_key(0, 0)) == []
    assert reader.store(0, 0, 0, n, data) and len(reader.cache.entries(reader.shard_key(0, 0))) == 1
    assert reader.store(0, 1, 0, 5, bytes(reader.fetch(shards.shard_url(1), reader.boundaries(0, 1), 0, 5)))


# ----------------------------------------------------------------------------------------------------------
# A full disk.


def _stream_with_filler(plan, rank, cache_dir, read_ahead_bytes=32 << 10):
    reader = _reader(plan, cache_dir)
    stream = ReadAhead(reader, plan, rank, range(plan.steps), read_ahead_bytes=read_ahead_bytes)
    filler = NodeFiller(_reader(plan, cache_dir), plan, rank, read_ahead_bytes=read_ahead_bytes,
                        frontier=lambda: stream.frontier).start()
    try:
        got = [(step, [(s["__source__"], s["__shard__"], s["__index__"], s["jpg"]) for s in ss])
               for step, ss in stream]
    finally:
        filler.stop()
        reader.close()
    return got, reader, filler


def _check_planned(plan, rank, got, truth_reader):
    """`got` holds the plan's samples of `rank`, step by step, with the bytes an uncached read gives."""
    assert [step for step, _ in got] == list(range(plan.steps))
    for step, samples in got:
        assert [s[:3] for s in samples] == plan.rank_samples(step, rank)
    plain = [(st, [s["jpg"] for s in ss]) for st, ss in ReadAhead(truth_reader, plan, rank, range(plan.steps))]
    assert [(st, [s[3] for s in ss]) for st, ss in got] == plain


@pytest.fixture
def full_folder(tmp_path):
    """A folder on a 256 KiB tmpfs: a real full disk once a few entries are in (needs root: mount)."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; test_a_full_disk_stops_caching_not_training[enospc] "
                    "covers the same path with ENOSPC raised by the writes")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("how", ["tmpfs", "enospc"])
def test_a_full_disk_stops_caching_not_training(shards, tmp_path, monkeypatch, request, how):
    plan = make_plan([shards], 240, 960, world_size=2, batch_size=8, seed=2)  # ~1 MB pool, 4 passes
    if how == "tmpfs":
        where = request.getfixturevalue("full_folder")
    else:
        where, real_open = tmp_path / "c", open
        calls = {"n": 0}

        def filling_open(path, mode="r", *a, **k):  # the disk fills up after 20 entries
            if "w" in mode:
                calls["n"] += 1
                if calls["n"] > 20:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real_open(path, mode, *a, **k)

        monkeypatch.setattr(cache_module, "open", filling_open, raising=False)
    with pytest.warns(UserWarning, match="No space left on device; caching stops, training goes on"):
        got, reader, filler = _stream_with_filler(plan, 0, where)
    assert reader.cache.full or filler.reader.cache.full
    _check_planned(plan, 0, got, ShardReader(plan.sets))
    assert reader.stats.cache_hits > 0  # what fitted is used
    assert not filler.error


# ----------------------------------------------------------------------------------------------------------
# One fetch per node.


def test_each_node_reads_each_sample_it_needs_exactly_once(shards, tmp_path):
    """Two nodes of two ranks (threads), each rank with its reader and its filler, concurrently: every rank gets
    the plan's samples with the right bytes, and what each node read from storage is exactly the bytes of the
    samples its ranks read over the run (the union): nothing twice, whatever raced."""
    plan = make_plan([shards], 120, 480, world_size=4, batch_size=4, seed=7)  # 4 passes
    results = {}

    def rank_job(rank):
        results[rank] = _stream_with_filler(plan, rank, tmp_path / f"node{rank // 2}", read_ahead_bytes=16 << 10)

    threads = [threading.Thread(target=rank_job, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    truth = ShardReader(plan.sets)
    for rank in range(4):
        _check_planned(plan, rank, results[rank][0], truth)
    for node in range(2):
        ranks = (2 * node, 2 * node + 1)
        read = sum(results[r][1].stats.bytes_read + results[r][2].reader.stats.bytes_read for r in ranks)
        assert read == _sample_bytes(plan, _reads(plan, ranks))
        assert sum(results[r][2].reader.stats.bytes_read for r in ranks) > 0  # the fillers did part of it
        assert not any(results[r][2].error for r in ranks)


def test_the_filler_holds_back_while_its_reader_starves(shards, tmp_path):
    from stream_ssl.data.fetch import ReadStats

    stats = ReadStats()
    waits = ReaderWaits(stats)
    stats.add(wait_seconds=0.005)
    assert not waits()  # within the slack
    stats.add(wait_seconds=0.02)
    assert waits() and not waits()
    plan = make_plan([shards], 240, 960, batch_size=8)  # ~4 MB to fill
    asked = threading.Event()

    def starving():
        asked.set()
        return True

    filler = NodeFiller(_reader(plan, tmp_path / "c"), plan, 0, read_ahead_bytes=64 << 10, starving=starving)
    filler.start()
    assert asked.wait(60)
    filler.stop()  # (a starving reader does not keep the filler from stopping)
    # its first round only: a whole mixing window (a round ends with one), read while nobody starved
    window = {x for step in range(plan.shuffle_window) for x in plan.rank_samples(step, 0)}
    assert 0 < filler.reader.stats.bytes_read <= _sample_bytes(plan, window) < _sample_bytes(plan, _reads(plan, [0]))


def test_loader_workers_and_the_filler_fetch_each_byte_once_over_http(folder, shards):
    """The loader with 2 DataLoader workers (processes) and the filler in worker 0, against an HTTP server that
    counts the shard bytes it sends: 4 passes on one node read the pool's bytes once, and the batches are the
    ones the loader gives without a cache."""
    from stream_ssl.data.augment import ViewSpec
    from stream_ssl.data.loader import make_loader

    server = HttpServer(folder)
    try:
        remote = make_plan([load_shard_set(server.url)], 120, 480, batch_size=8, num_workers=2, seed=4)
        local = make_plan([shards], 120, 480, batch_size=8, num_workers=2, seed=4)
        views = [ViewSpec(16)]
        import tempfile

        with tempfile.TemporaryDirectory() as cache:
            batches = list(make_loader(remote, 0, views, num_workers=2, cache_dir=cache, read_ahead_bytes=64 << 10))
        want = list(make_loader(local, 0, views))
        assert [(b.step, b.keys) for b in batches] == [(b.step, b.keys) for b in want]
        assert all((a.views[0] == b.views[0]).all() for a, b in zip(batches, want))
        assert server.ranged_bytes == _sample_bytes(local, _reads(local, [0]))
        assert sum(b.cache_hits for b in batches) > 0
    finally:
        server.close()
