"""The shard check before training (shard_tools/listing.py): listings of each folder (object stores: by name
prefixes, many at once) find missing shards, shards of another size and missing .idx files; the trainer,
`python -m stream_ssl.plan --check` and `shard-tools verify` use it and stop with one line naming them."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest

from shard_tools import listing
from shard_tools.listing import ShardsMissing, check_shards, require_shards
from shard_tools.shardset import idx_name, load_shard_set
from shard_tools.storage import BucketNotFound, StorageAccessDenied
from shard_tools.verify import verify
from stream_ssl.data.plan import make_plan
from stream_ssl.plan import main as plan_main
from stream_ssl.testing.listing import PAGE, FakeBucket, fake_set
from stream_ssl.testing.servers import s3_client_error
from stream_ssl.train import main as train_main
from tests.helpers.trainer import train_args


@pytest.fixture
def damaged(make_shard_set, tmp_path):
    """A copy of an 8-shard set with shard 3 deleted, shard 6 cut to 1000 bytes and shard 5's .idx deleted."""
    folder = tmp_path / "set"
    shutil.copytree(make_shard_set(240, shard_size=30, seed=11), folder)
    (folder / "set-000003.tar").unlink()
    (folder / "set-000005.idx").unlink()
    os.truncate(folder / "set-000006.tar", 1000)
    return folder


def _count_scandir(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = os.scandir

    def scandir(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)  # (local folders are listed by shard_tools/protocols/local.py)
    return calls


def test_one_listing_finds_missing_changed_and_idx_less_shards(damaged, monkeypatch):
    calls = _count_scandir(monkeypatch)
    s = load_shard_set(str(damaged))
    check = check_shards(s)
    assert calls == [str(damaged)] and check.listings == 1  # one listing for 8 shards, no request per shard
    assert check.missing.tolist() == [3] and check.changed.tolist() == [6] and check.no_idx.tolist() == [5]
    assert not check.ok and check.size_of(6) == 1000 and check.size_of(3) is None
    assert check.summary() == (f"{damaged}: 1 of 8 shards missing (set-000003.tar); 1 changed size (set-000006.tar: "
                               f"1000 bytes, index.json says {s.shards[6].bytes}); 1 without their .idx "
                               "(set-000005.idx)")
    assert check_shards(s, [0, 1, 2, 4, 7]).ok  # only the shards asked about count
    with pytest.raises(ShardsMissing) as e:
        require_shards([(s, [1, 3])])
    assert "\n" not in str(e.value) and "set-000003.tar" in str(e.value) and f"verify {damaged}" in str(e.value)


def test_a_million_entry_listing_is_paged_and_names_the_first_few(monkeypatch):
    """The s3 path against a fake bucket: 2 x 2500 entries arrive in 5 pages (one listing); many missing shards
    are named three at a time and counted."""
    s = fake_set(2500)
    bucket = FakeBucket(s, missing=range(100, 110), resized=[7], no_idx=[2400])
    check = check_shards(s, storage_options={}, fs=bucket)
    assert bucket.pages == 2 * 2500 // PAGE and check.listings == 1
    assert check.missing.tolist() == list(range(100, 110)) and check.changed.tolist() == [7]
    assert check.no_idx.tolist() == [2400]
    assert "10 of 2500 shards missing (pool-0000100.tar, pool-0000101.tar, pool-0000102.tar and 7 more)" in \
        check.summary()
    assert check_shards(fake_set(3), fs=FakeBucket(fake_set(3))).ok


def test_http_sets_cannot_be_listed_and_are_not_checked():
    check = check_shards(fake_set(3, url="https://example.org/pool"))
    assert check.ok and not check.listed and "not checked" in check.summary()


def test_training_stops_before_the_first_step_naming_the_missing_shard(damaged, tmp_path, capsys):
    out = tmp_path / "run"
    code = train_main(train_args(damaged, out, unique_samples="240", budget_samples="64", log_with="none"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: shards missing or changed since index.json was written: ")
    assert "1 of 8 shards missing (set-000003.tar)" in err[0] and "set-000006.tar: 1000 bytes" in err[0]
    assert not (out / "checkpoints").exists() and not (out / "metrics.csv").exists()  # nothing was trained


def test_plan_check_and_verify_use_the_same_listing(damaged, make_shard_set, capsys):
    args = ["--unique-samples", "240", "--budget-samples", "480", "--batch-size", "16", "--check"]
    assert plan_main(["--data", str(damaged), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "set-000003.tar" in err and "set-000005.idx" in err
    good = make_shard_set(240, shard_size=30, seed=11)
    assert plan_main(["--data", str(good), *args]) == 0
    assert "8 shards and their .idx present with the sizes index.json records (1 listing" in capsys.readouterr().err
    plan = make_plan([load_shard_set(str(good))], 60, 60, batch_size=10, seed=0)  # a pool of 2 of the 8 shards
    (s, used), = plan.shards_used()
    assert used.tolist() == sorted(set(plan.unit_shard.tolist())) and len(used) == 2

    report = io.StringIO()
    assert not verify(str(damaged), contents=False, out=report)
    lines = report.getvalue().splitlines()
    size = load_shard_set(str(good)).shards[6].bytes
    assert lines[:3] == ["BAD set-000003.tar: missing", "BAD set-000005.tar: no set-000005.idx",
                         f"BAD set-000006.tar: size 1000 bytes, index.json says {size}"]
    assert "listed 8 shards" in lines[-1] and lines[-1].endswith("3 bad")


class _Store:
    """An fsspec-like folder whose listing fails with `error` (as s3fs raises it: translated, cause attached)."""

    def __init__(self, error: Exception):
        self.error = error

    def _strip_protocol(self, url: str) -> str:
        return url.split("://", 1)[1]

    def ls(self, path: str, detail: bool = True):
        raise self.error


def test_a_missing_bucket_is_not_an_empty_folder():
    seen: list = []
    listing.list_folder("memory://bucket/set", lambda *e: seen.append(e), fs=_Store(FileNotFoundError("no folder")))
    assert seen == []  # a folder that does not exist has no files
    with pytest.raises(BucketNotFound, match=r"^memory://bucket: the bucket does not exist"):
        listing.list_folder("memory://bucket/set", seen.append, fs=_Store(s3_client_error("NoSuchBucket", 404)))
    with pytest.raises(StorageAccessDenied, match=r"^memory://bucket/set: access denied \(the store does not know"):
        listing.list_folder("memory://bucket/set", seen.append, fs=_Store(s3_client_error("InvalidAccessKeyId", 403)))


# ----------------------------------------------------------------------------------------------------------
# Listing by prefixes, many at once (object stores).


def _report(check) -> tuple:
    return check.missing.tolist(), check.changed.tolist(), check.no_idx.tolist(), check.summary().split(" (")[0]


def test_a_million_entries_listed_by_prefixes_give_the_one_listing_report():
    """500,000 shards and their .idx (1M entries): the check of every shard lists 500 prefixes of 1000 shards,
    many at once, in about entries / 1000 requests, and reports what one listing of the folder reports."""
    n = 500_000
    s = fake_set(n)
    faults = dict(missing=[0, 1, 250_000, n - 1], resized=[7, 400_000], no_idx=[3, 123_456])
    whole = check_shards(s, fs=FakeBucket(s, **faults))  # a whole-set check: one listing, page after page
    bucket = FakeBucket(s, **faults, latency=0.001)
    check = check_shards(s, range(n), fs=bucket)
    assert _report(check) == _report(whole)
    assert check.missing.tolist() == [0, 1, 250_000, n - 1] and check.changed.tolist() == [7, 400_000]
    assert check.no_idx.tolist() == [3, 123_456] and check.listings == bucket.listings == n // 1000
    assert 2 * n / PAGE <= bucket.pages <= 2 * n / PAGE + 5
    assert bucket.most_in_flight > 8  # listed at once, not one after another


def test_a_small_set_costs_one_request_and_a_few_shards_of_a_large_one_a_few():
    small = fake_set(400)
    bucket = FakeBucket(small, missing=[5])
    assert check_shards(small, [1, 5, 399], fs=bucket).missing.tolist() == [5]
    assert bucket.pages == bucket.listings == 1
    large = fake_set(100_000)
    bucket = FakeBucket(large, missing=[99_999])
    check = check_shards(large, [3, 50_001, 99_999], fs=bucket)
    assert check.missing.tolist() == [99_999] and check.listings == 3 and bucket.pages <= 6  # not 200 pages


@pytest.mark.parametrize("seed", range(5))
def test_prefixes_cover_every_wanted_shard_and_its_idx(seed):
    """Irregular names (different lengths, a stem that begins other names, names without .tar): every wanted
    shard and its .idx start with one listed prefix, and a prefix holds at most `limit` shards where the names
    can be told apart."""
    rng = np.random.default_rng(seed)
    names = {"".join(rng.choice(list("ab.-0"), size=rng.integers(1, 6))) + rng.choice([".tar", ""])
             for _ in range(300)}
    names = sorted(n for n in names if n not in (".tar", ""))
    wanted = rng.random(len(names)) < 0.5
    prefixes = listing.shard_prefixes(names, wanted, limit=4)
    for name in np.array(names)[wanted]:
        holding = [p for p in prefixes if name.startswith(p) and idx_name(name).startswith(p)]
        assert holding, (name, prefixes)
    for p in prefixes:
        within = [n for n in names if n.startswith(p)]
        assert len(within) <= 4 or p in within or any(len(n) - 4 * n.endswith(".tar") <= len(p) for n in within)
    assert listing.shard_prefixes(names, np.zeros(len(names), bool)) == []
    assert listing.shard_prefixes(names, wanted) == [""]  # at most PER_PREFIX shards: the whole folder


def test_a_failing_prefix_is_retried_alone_and_a_missing_bucket_is_named():
    s = fake_set(5000)
    bucket = FakeBucket(s)
    failed: list[str] = []

    def once(prefix: str) -> None:
        if prefix.endswith("pool-0003") and not failed:
            failed.append(prefix)
            raise s3_client_error("SlowDown", 503, "ListObjectsV2")

    bucket.fail = once
    check = check_shards(s, range(5000), fs=bucket, storage_options={})
    assert check.ok and failed == ["pool/pool-0003"] and bucket.listings == check.listings + 1 == 6
    bucket.fail = lambda prefix: (_ for _ in ()).throw(s3_client_error("NoSuchBucket", 404, "ListObjectsV2"))
    with pytest.raises(BucketNotFound, match=r"^s3://bucket: the bucket does not exist"):
        check_shards(s, range(5000), fs=bucket, storage_options={})
    bucket.fail = lambda prefix: (_ for _ in ()).throw(s3_client_error("AccessDenied", 403, "ListObjectsV2"))
    with pytest.raises(StorageAccessDenied, match=r"^s3://bucket/pool: access denied \(wrong credentials"):
        check_shards(s, range(5000), fs=bucket, storage_options={})


@pytest.mark.parametrize("seed", range(3))
def test_a_random_subset_checked_by_interleaved_prefixes_is_reported_exactly(seed, monkeypatch):
    """Prefix listings in flight together deliver their pages interleaved: whatever the order, every shard asked
    about is found or reported, and nothing else is."""
    monkeypatch.setattr(listing, "PER_PREFIX", 10)
    rng = np.random.default_rng(seed)
    n = 20_000
    s = fake_set(n)
    wanted = np.sort(rng.choice(n, 3000, replace=False))
    faults = {k: rng.choice(n, 300, replace=False).tolist() for k in ("missing", "resized", "no_idx")}
    bucket = FakeBucket(s, **faults, latency=0.0005)
    check = check_shards(s, wanted.tolist(), fs=bucket)
    w = set(wanted.tolist())
    missing = w & set(faults["missing"])
    assert check.missing.tolist() == sorted(missing)
    assert check.changed.tolist() == sorted(w & set(faults["resized"]) - missing)
    assert check.no_idx.tolist() == sorted(w & set(faults["no_idx"]) - missing)
    assert bucket.most_in_flight > 1 and check.listings == bucket.listings
