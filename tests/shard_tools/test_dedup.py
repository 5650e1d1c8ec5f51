"""shard_tools/dedup.py: the pHash by its definition, the banded search against brute force, planted
near-duplicates and leakage found (precision and recall >= 0.95), the filtered shard set, the hash cache."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from scipy.fft import dct

from shard_tools import dedup
from shard_tools.dedup import (
    HASH_SIDE,
    dct_matrix,
    hash_pixels,
    main,
    near_pairs,
    phash,
    popcount,
)
from shard_tools.shardset import load_shard_set
from shard_tools.verify import verify
from stream_ssl.data.plan import Slice, make_plan
from stream_ssl.data.reader import ShardReader
from stream_ssl.testing.near_dups import VARIANTS, jpeg, origin_of, photo, planted_sets, scores, variant
from tests.helpers import PYTHON
from tests.helpers.images import corrupt_copy
from tests.helpers.packing import run_tool, tree

# ----------------------------------------------------------------------------------------------------------
# The hash and the search.


def test_dct_matrix_is_scipys_orthonormal_dct2():
    x = np.random.default_rng(0).normal(size=(HASH_SIDE, 5))
    assert dct_matrix(HASH_SIDE) @ x == pytest.approx(dct(x, type=2, norm="ortho", axis=0), abs=1e-12)


def test_hash_bits_are_the_low_frequencies_above_their_median():
    # an image made of 64 chosen low-frequency coefficients (inverse DCT): its hash is their sign pattern
    # against their median, coefficient (0, 0) in the highest bit, row-major
    rng = np.random.default_rng(1)
    coef = rng.permutation(64).astype(float).reshape(8, 8) + 100.0
    d = dct_matrix(HASH_SIDE)[:8]
    image = d.T @ coef @ d  # 32 x 32
    bits = (coef.ravel() > np.median(coef)).astype(int)
    expected = int("".join(map(str, bits)), 2)
    assert int(hash_pixels(image[None])[0]) == expected
    assert popcount(np.array([expected], np.uint64))[0] == 32  # half the coefficients are above the median


def test_variants_are_close_and_different_photos_are_far():
    far, close = [], {k: [] for k in VARIANTS}
    for o in range(12):
        im = photo(500 + o)
        h = phash(jpeg(im))
        far.append(h)
        for i, k in enumerate(VARIANTS):
            close[k].append(bin(h ^ phash(variant(im, k, o * 5 + i))).count("1"))
    assert max(close["reencode"] + close["resize"]) <= 6
    assert np.median(close["colour"]) <= 8
    h = np.array(far, np.uint64)
    distinct = popcount(h[:, None] ^ h[None, :])[np.triu_indices(len(h), 1)]
    assert distinct.min() > 12 and 24 < distinct.mean() < 40  # unrelated images differ in about half the bits


@pytest.mark.parametrize("threshold", [0, 3, 4, 7, 10, 15])
def test_banded_search_finds_exactly_the_pairs_within_the_threshold(threshold):
    rng = np.random.default_rng(threshold)
    base = rng.integers(0, 2**63, size=400, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 400, np.uint64)
    flips = [np.uint64(sum(1 << int(b) for b in rng.choice(64, size=int(rng.integers(0, 17)), replace=False)))
             for _ in range(300)]
    near = base[rng.integers(0, 400, size=300)] ^ np.array(flips, np.uint64)  # planted pairs at 0..16 bits
    table = np.unique(np.concatenate([base, near]))
    queries = table[rng.permutation(len(table))[:350]]
    i, j, d = near_pairs(queries, table, threshold)
    brute = popcount(queries[:, None] ^ table[None, :])
    want = np.argwhere(brute <= threshold)
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(map(tuple, want.tolist()))
    assert (d == brute[i, j]).all()
    assert len(want) > len(queries) or threshold == 0  # the self matches, and planted pairs from 1 bit on


# ----------------------------------------------------------------------------------------------------------
# A generated set with planted near-duplicates and leakage.


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_sets(tmp_path_factory.mktemp("planted"), pool_bases=90, down_bases=40, copied=0.3, leaked=10)


def pool_keys(folder) -> list[str]:
    s = load_shard_set(str(folder))
    reader = ShardReader((s,))
    return [k for j, info in enumerate(s.shards) for k in reader.keys(Slice(0, j, 0, info.samples))]


@pytest.fixture(scope="module")
def report(planted, tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    path = root / "report.json"
    proc = run_tool("dedup.py", planted.pool, "--against", planted.down, "--report", path, "--cache-dir",
                    root / "cache", "--write-filtered", root / "filtered", "--shard-size", "40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(path.read_text()), root, proc.stdout


def test_planted_near_duplicates_and_leakage_are_found(planted, report):
    r, _, stdout = report
    s = scores(r, planted, pool_keys(planted.pool))
    assert s["group_precision"] >= 0.95 and s["group_recall"] >= 0.95, s
    assert s["leak_precision"] >= 0.95 and s["leak_recall"] >= 0.95, s
    assert s["true_pairs"] >= 20 and s["true_leaked"] == 10
    # the contract: keys as in the shards; each leak names the downstream images it copies
    for leak in r["leaked"]:
        assert leak["set"] == str(planted.pool) and leak["match_sets"] == [str(planted.down)] * len(leak["matches"])
        assert {origin_of(k) for k in leak["matches"]} == {origin_of(leak["key"])}
    for group, sets in zip(r["groups"], r["group_sets"]):
        assert group[0].endswith("v0") or len({origin_of(k) for k in group}) == 1
        assert sets == [str(planted.pool)] * len(group)
    assert r["near_duplicates"] == sum(len(g) - 1 for g in r["groups"]) and r["leaked_images"] == len(r["leaked"])
    assert r["images"] == {str(planted.pool): planted.pool_images, str(planted.down): planted.down_images}
    assert f"leaked: {len(r['leaked'])} pool images" in stdout


def test_filtered_set_keeps_one_per_group_drops_leaks_verifies_and_reads(planted, report):
    r, root, _ = report
    out = root / "filtered"
    assert verify(str(out))
    keys = pool_keys(out)
    kept = set(keys)
    assert len(keys) == planted.pool_images - r["near_duplicates"] - r["leaked_images"] == len(kept)
    assert all(g[0] in kept and not kept & set(g[1:]) for g in r["groups"])
    assert not kept & {x["key"] for x in r["leaked"]}
    assert keys == [k for k in pool_keys(planted.pool) if k in kept]  # the original order
    # original bytes: every kept sample's members equal the source's
    src, new = load_shard_set(str(planted.pool)), load_shard_set(str(out))
    before = {s["__key__"]: s for s in ShardReader((src,)).read_all([Slice(0, j, 0, i.samples)
                                                                     for j, i in enumerate(src.shards)])}
    after = ShardReader((new,)).read_all([Slice(0, j, 0, i.samples) for j, i in enumerate(new.shards)])
    assert all(s["jpg"] == before[s["__key__"]]["jpg"] and s["json"] == before[s["__key__"]]["json"] for s in after)
    assert new.meta["filtered"]["removed"] == planted.pool_images - len(keys) and new.source == "generated"
    assert max(i.samples for i in new.shards) == 40
    plan = make_plan([new], len(keys), 2 * len(keys), batch_size=8)  # a run's plan over it: N counts distinct
    assert plan.unique_samples == len(keys)


def test_filtered_output_is_deterministic_and_hashes_resume_from_the_cache(planted, report, tmp_path, monkeypatch):
    r, root, _ = report
    assert len(list((root / "cache").glob("*.json"))) == len(load_shard_set(str(planted.pool)).shards) + len(
        load_shard_set(str(planted.down)).shards)

    def no_reads(*args, **kwargs):
        raise AssertionError("a shard was read again")

    monkeypatch.setattr(dedup, "hash_samples", no_reads)  # everything must come from the cache
    path = tmp_path / "again.json"
    assert main([str(planted.pool), "--against", str(planted.down), "--report", str(path), "--cache-dir",
                 str(root / "cache"), "--write-filtered", str(tmp_path / "filtered"), "--shard-size", "40",
                 "--no-progress"]) == 0
    again = json.loads(path.read_text())
    assert again["groups"] == r["groups"] and again["leaked"] == r["leaked"]
    assert tree(tmp_path / "filtered") == tree(root / "filtered")  # byte for byte


def test_a_tighter_threshold_finds_a_subset_and_a_damaged_cache_file_is_rehashed(planted, report, tmp_path):
    r, root, _ = report
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache)
    victim = sorted(cache.glob("*.json"))[0]
    victim.write_text("{not json")
    path = tmp_path / "t4.json"
    assert main([str(planted.pool), "--against", str(planted.down), "--report", str(path), "--cache-dir", str(cache),
                 "--threshold", "4", "--no-progress"]) == 0
    tight = json.loads(path.read_text())
    assert json.loads(victim.read_text())["keys"]  # rewritten whole
    pairs = lambda rep: {(a, b) for g in rep["groups"] for a in g for b in g if a < b}  # noqa: E731
    assert pairs(tight) <= pairs(r) and {x["key"] for x in tight["leaked"]} <= {x["key"] for x in r["leaked"]}


def test_undecodable_images_are_skipped_counted_and_left_out(planted, tmp_path, capsys):
    bad = corrupt_copy(planted.pool, tmp_path, {(0, 3): "zeros"})
    path = tmp_path / "r.json"
    assert main([bad.url, "--report", str(path), "--no-cache", "--write-filtered", str(tmp_path / "f"),
                 "--no-progress"]) == 0
    r = json.loads(path.read_text())
    (skip,) = r["skipped"]
    assert skip["set"] == bad.url and "undecodable" in skip["reason"]
    assert skip["key"] not in pool_keys(tmp_path / "f")
    assert re.search(r"skipped: 1 sample\b", capsys.readouterr().out)
    assert r["images"][bad.url] == planted.pool_images - 1


def test_bad_input_gets_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--report", str(tmp_path / "r.json")]) == 2  # a usage error
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "not a shard set" in line
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--report", str(tmp_path / "r.json"), "--threshold", "16"])
    assert "must be in 0..15" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_worker_processes_give_the_same_report(planted, report, tmp_path):
    r, _, _ = report
    path = tmp_path / "w.json"
    proc = run_tool("dedup.py", planted.pool, "--against", planted.down, "--report", path, "--no-cache",
                    "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    w = json.loads(path.read_text())
    assert (w["groups"], w["leaked"], w["workers"]) == (r["groups"], r["leaked"], 2)


@pytest.mark.multiprocess
def test_a_run_trains_on_the_filtered_set(report, tmp_path):
    from tests.helpers.trainer import TRAIN, run, train_args

    _, root, _ = report
    proc = run([PYTHON, TRAIN, *train_args(root / "filtered", tmp_path / "run", budget_samples=64,
                                           unique_samples="1.0")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 64 // 16 and summary["plan"]["unique_samples"] == len(pool_keys(root / "filtered"))


def test_a_candidate_far_on_the_256_bit_hash_is_not_a_near_copy():
    from shard_tools.dedup import VIEWS, WORDS, hash_graph

    sig = np.zeros((3, VIEWS, WORDS), np.uint64)
    sig[:, :, 0] = np.uint64(0xFFFF)  # every view of every image: the same 64-bit hash
    sig[1, :, 1:] = np.uint64(1)  # image 1: 4 bits from image 0 on the 256-bit hash
    sig[2, :, 1:] = np.uint64(2**40 - 1)  # image 2: 160 bits from image 0, 164 from image 1
    g = hash_graph(sig, threshold=0, verify=72)
    assert (g.size, g.a.tolist(), g.b.tolist(), g.fine.tolist()) == (3, [0], [1], [4])
    assert hash_graph(sig, threshold=0, verify=256).a.tolist() == [0, 0, 1]


def test_several_pool_sets_are_one_pool_and_filter_into_one_folder_each(planted, report, tmp_path):
    _, root, _ = report
    path = tmp_path / "r.json"
    assert main([str(planted.pool), str(planted.down), "--report", str(path), "--cache-dir", str(root / "cache"),
                 "--write-filtered", str(tmp_path / "out"), "--no-progress"]) == 0
    r = json.loads(path.read_text())
    # the leaked variants now pair with their downstream originals inside the pool, across the two sets
    across = [sets for sets in r["group_sets"] if len(set(sets)) == 2]
    assert len(across) == 10 and all(sets[0] == str(planted.pool) for sets in across)
    assert r["leaked"] == [] and r["against"] == []
    assert verify(str(tmp_path / "out" / "pool")) and verify(str(tmp_path / "out" / "down"))
    # the first of each group (set order: the pool's variant) stays, its downstream original goes
    assert len(pool_keys(tmp_path / "out" / "down")) == planted.down_images - 10
