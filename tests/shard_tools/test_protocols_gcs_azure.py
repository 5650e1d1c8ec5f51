"""Google Cloud Storage (`gs://`, gcsfs) and Azure Blob Storage (`az://`, adlfs) end to end, each against its
emulator on loopback (stream_ssl/testing/emulators.py): a set packed to the store, planned, checked and read with
the same keys and bytes as from local disk, trained from in-process, and read through the fault proxy's cuts,
resets and 503s; a missing bucket or container and refused credentials named in one line. A store whose
emulator cannot start skips with the reason. The registry entries' rules (shard_tools/protocols) are checked
without a server at the end."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from shard_tools import listing
from shard_tools.listing import check_shards, list_folder
from shard_tools.pack import main as pack_main
from shard_tools.shardset import ShardInfo, load_shard_set
from shard_tools.storage import BucketNotFound, StorageAccessDenied, check_access
from stream_ssl.data.plan import make_plan
from stream_ssl.data.readahead import ReadAhead
from stream_ssl.data.reader import ShardReader
from stream_ssl.plan import main as plan_main
from stream_ssl.testing.emulators import AZURITE_KEY, EMULATORS, EmulatorMissing
from stream_ssl.testing.servers import FaultProxy, fault_schedule
from tests.helpers.faults import lost_and_duplicated

pytestmark = pytest.mark.emulator

BUCKET = "shards"
PACK = ["--name", "set", "--shard-size", "30", "--seed", "1"]
PLAN = ["--unique-samples", "90", "--budget-samples", "180", "--world-size", "2", "--batch-size", "9"]


@pytest.fixture(scope="module", params=sorted(EMULATORS))
def store(request):
    """The emulator of one store (gs, az), with the bucket BUCKET."""
    try:
        emulator = EMULATORS[request.param]()
    except EmulatorMissing as e:
        pytest.skip(f"{request.param}:// emulator: {e}")
    try:
        emulator.create_bucket(BUCKET)
        yield emulator
    finally:
        emulator.close()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from shard_tools.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("images"), 120, classes=4, size=24, seed=3)


@pytest.fixture(scope="module")
def local(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "pool"
    assert pack_main([str(manifest), "--out", str(out), *PACK]) == 0
    return out


@pytest.fixture(scope="module")
def remote(store, manifest, local):
    """The same manifest packed straight to the store (`shard-tools pack --out gs://...`)."""
    url = f"{store.scheme}://{BUCKET}/sets/pool"
    assert pack_main([str(manifest), "--out", url, *PACK, "--storage-options", json.dumps(store.options())]) == 0
    return url


def _samples(plan, rank: int, reader) -> list:
    return [(step, [(s["__key__"], bytes(s["jpg"]), s.get("cls")) for s in samples])
            for step, samples in ReadAhead(reader, plan, rank, range(plan.steps))]


def _plans(local, remote, options, **kw):
    return (make_plan([load_shard_set(str(local))], **kw),
            make_plan([load_shard_set(remote, options)], **kw))


def test_packed_to_the_store_it_reads_the_same_keys_and_bytes_as_local_disk(store, local, remote):
    options = store.options()
    assert load_shard_set(remote, options).shards == load_shard_set(str(local)).shards  # names, sizes, sha256
    want, plan = _plans(local, remote, options, unique_samples=90, budget_samples=180, world_size=2, batch_size=9,
                        seed=2)
    for rank in range(2):
        reader = ShardReader(plan.sets, options)
        assert _samples(plan, rank, reader) == _samples(want, rank, ShardReader(want.sets))
        assert reader.stats.bytes_read > 0 and reader.stats.retries == 0 and reader.stats.index_fetches > 0


def test_plan_prints_the_same_keys_and_one_listing_checks_the_shards(store, local, remote, capsys):
    options = json.dumps(store.options())
    assert plan_main(["--data", remote, *PLAN, "--keys", "--rank", "1", "--storage-options", options]) == 0
    from_store = capsys.readouterr().out.split()
    assert plan_main(["--data", str(local), *PLAN, "--keys", "--rank", "1"]) == 0
    assert from_store == capsys.readouterr().out.split() and len(from_store) == 180 // 18 * 9
    check = check_shards(load_shard_set(remote, store.options()), storage_options=store.options())
    assert check.ok and check.listings == 1 and check.summary().startswith(f"{remote}: 4 shards and their .idx")


def test_the_shard_check_lists_prefixes_at_once(store, remote, monkeypatch):
    """Given shards are listed by name prefixes (one shard a prefix here), many at once; a shard index.json names
    that the store lacks is missing, as one listing of the folder finds."""
    monkeypatch.setattr(listing, "PER_PREFIX", 1)
    pool = load_shard_set(remote, store.options())
    check = check_shards(pool, range(4), storage_options=store.options())
    assert check.ok and check.listings == 4
    ghost = ShardInfo("set-000009.tar", 30, 1000)  # (not in the store)
    more = dataclasses.replace(pool, shards=(*pool.shards, ghost))
    check = check_shards(more, range(5), storage_options=store.options())
    whole = check_shards(more, storage_options=store.options())
    assert check.listings == 5 and check.missing.tolist() == whole.missing.tolist() == [4]
    assert check.summary() == whole.summary()
    two = check_shards(more, [1, 4], storage_options=store.options())
    assert two.listings == 2 and two.missing.tolist() == [4]


def test_training_from_the_store_trains_on_the_local_keys(store, local, remote, tmp_path):
    """train.py (in this process) on the store, directly and through the fault proxy cutting every 3rd connection
    after 20-60 KB: the same keys at the same steps as from local disk."""
    from stream_ssl.train import main as train_main
    from tests.helpers.trainer import train_args

    flags = dict(unique_samples="64", budget_samples="128", log_with="none", log_keys="true",
                 read_ahead_bytes="64KiB")  # (many requests: each a chance to be cut)
    proxy = FaultProxy(store.port, fault_schedule(seed=7, every=3, max_faults=10, cut_range=(20_000, 60_000)))
    keys = {}
    try:
        for name, data, options in (("local", str(local), None), ("store", remote, store.options()),
                                    ("cut", remote, store.options(proxy.endpoint))):
            extra = {"storage_options": json.dumps(options)} if options else {}
            assert train_main(train_args(data, tmp_path / name, **flags, **extra)) == 0
            keys[name] = (tmp_path / name / "keys" / "rank-0.txt").read_text().split()
    finally:
        proxy.close()
    assert keys["store"] == keys["cut"] == keys["local"] and len(keys["local"]) == 2 * 128
    for f in (tmp_path / "store").rglob("*"):  # config.json and checkpoints keep the options, redacted
        assert not f.is_file() or AZURITE_KEY.encode() not in f.read_bytes(), f
    summary = json.loads((tmp_path / "store" / "summary.json").read_text())["storage"]
    assert summary["requests"] > 0 and summary["bytes_read"] > 0
    assert proxy.kinds.get("cut", 0) >= 1, proxy.kinds


FAULTS = {"cuts": "connections cut at random points (every 2nd: cut mid-body, reset, or 503)",
          "503s": "503 bursts (requests 2-7)"}
STORES = {"gs": "GCS", "az": "Azure Blob"}


@pytest.mark.faults
@pytest.mark.parametrize("faults", list(FAULTS))
def test_cut_connections_and_503s_still_yield_every_planned_sample_exactly_once(faults, store, local, remote,
                                                                                fault_row):
    """Through the fault proxy: every 2nd connection cut mid-body, reset or answered 503 (`cuts`), or requests
    answered `503 SlowDown` in a burst (`503s`); the reader resumes at sample boundaries."""
    want, plan = _plans(local, remote, store.options(), unique_samples=120, budget_samples=240, world_size=1,
                        batch_size=12, seed=4)
    settings = (dict(schedule=fault_schedule(seed=3, every=2, max_faults=25, cut_range=(64, 20_000)))
                if faults == "cuts" else dict(slowdown=range(2, 8)))
    proxy = FaultProxy(store.port, **settings)
    try:
        reader = ShardReader(plan.sets, store.options(proxy.endpoint), backoff=0.01, retries=10,
                             request_bytes=16 * 1024)
        got, expected = _samples(plan, 0, reader), _samples(want, 0, ShardReader(want.sets))
    finally:
        proxy.close()
    lost, dup = lost_and_duplicated([s for _, ss in got for s in ss], [s for _, ss in expected for s in ss])
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(proxy.kinds.items()))
    fault_row(f"{STORES[store.scheme]} (emulator), reads: {FAULTS[faults]}", lost, dup,
              samples=sum(len(ss) for _, ss in got), faults=kinds, requests=proxy.requests,
              retries=reader.stats.retries, throttled=reader.stats.throttled)
    assert got == expected and reader.stats.retries > 0 and reader.stats.cut > 0, proxy.kinds
    if faults == "cuts":
        assert proxy.faults >= 4 and proxy.kinds.get("cut", 0) >= 3, proxy.kinds
    else:
        assert reader.stats.throttled >= 1 and proxy.kinds.get("503", 0) == 6, (reader.stats, proxy.kinds)


def test_a_missing_bucket_is_named_by_plan_listing_writers_and_pack(store, manifest, capsys):
    word = {"gs": "bucket", "az": "container"}[store.scheme]
    url, options = f"{store.scheme}://no-such-bucket/sets/pool", store.options()
    said = f"{store.scheme}://no-such-bucket: the {word} does not exist (endpoint {store.endpoint}"
    with pytest.raises(BucketNotFound, match=re.escape(said)):
        check_access(url, options)  # what writers check before any work
    with pytest.raises(BucketNotFound, match=re.escape(said)):
        list_folder(url, lambda name, size: None, options)
    assert pack_main([str(manifest), "--out", url, "--storage-options", json.dumps(options)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {said}")
    check_access(f"{store.scheme}://{BUCKET}/sets/pool", options)  # an existing one passes


@pytest.mark.parametrize("store", ["az"], indirect=True)  # (the GCS emulator accepts any credentials)
def test_refused_azure_credentials_name_the_url_and_where_credentials_come_from(store, remote, capsys):
    other = "AAAA" + AZURITE_KEY[4:]  # (a valid key, of another account)
    wrong = store.options(key=other)
    # (Azure answers a wrong key with AuthenticationFailed, Azurite with AuthorizationFailure)
    said = (r"access denied \((the account key, SAS token or credential was not accepted: AuthenticationFailed|"
            r"wrong credentials, or no permission: AuthorizationFailure)\); credentials come from")
    with pytest.raises(StorageAccessDenied, match=said):
        check_access(remote, wrong)
    assert plan_main(["--data", remote, *PLAN, "--storage-options", json.dumps(wrong)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {remote}/index.json: access denied ("), err
    assert "AZURE_STORAGE_CONNECTION_STRING" in err and other not in err


# ----------------------------------------------------------------------------------------------------------
# The entries' rules, without a server.


def test_azure_connection_strings_and_account_keys_are_never_written_down():
    from shard_tools.storage import redact, redact_options

    text = f"DefaultEndpointsProtocol=http;AccountName=a;AccountKey={AZURITE_KEY};BlobEndpoint=http://h/a;"
    assert AZURITE_KEY not in redact(f"failed with {text} and more") and "AccountName=a" in redact(text)
    kept = json.loads(redact_options(json.dumps({"az": {"connection_string": text, "account_key": "k",
                                                        "account_name": "a", "sas_token": "s"}})))
    assert kept == {"az": {"connection_string": "<redacted>", "account_key": "<redacted>", "account_name": "a",
                           "sas_token": "<redacted>"}}


def test_every_scheme_has_one_entry_and_aliases_share_options():
    from shard_tools.protocols import ENTRIES, protocol
    from shard_tools.storage import PROTOCOL_KEYS, fs_path, options_for

    schemes = [s for entry in ENTRIES for s in entry.schemes]
    assert len(schemes) == len(set(schemes)) and set(schemes) <= set(PROTOCOL_KEYS)
    assert [protocol(u).name for u in ("gcs://b/k", "abfss://c/k", "s3a://b/k", "/x", "memory://m")] == \
        ["gs", "az", "s3", "file", "memory"]
    assert options_for("gcs://b/k", {"gs": {"token": "anon"}}) == {"token": "anon"}
    assert options_for("abfs://c/k", {"az": {"account_name": "a"}, "s3": {"anon": True}}) == {"account_name": "a"}
    assert fs_path("gs://b/sets/pool") == fs_path("gcs://b/sets/pool") == "b/sets/pool"
    assert fs_path("az://c/sets/pool") == fs_path("abfs://c/sets/pool") == "c/sets/pool"


def test_a_ranged_get_answered_with_more_than_the_range_is_an_error():
    from shard_tools.protocols.base import RangeIgnored, check_range

    check_range(206, 10, 5, 15)  # partial content
    check_range(200, 10, 0, 10)  # the whole object was the range
    check_range(200, 999, None, None)  # not a ranged GET
    for status, length, start in ((200, 100, 5), (200, 100, 0)):
        with pytest.raises(RangeIgnored, match=rf"ignores range requests \(status {status}\)"):
            check_range(status, length, start, start + 10)


def test_gcs_and_azure_errors_are_classified(monkeypatch):
    pytest.importorskip("gcsfs")
    pytest.importorskip("adlfs")
    from azure.core.exceptions import HttpResponseError
    from gcsfs.retry import HttpError

    from shard_tools.storage import is_not_found, is_throttled, is_transient, storage_error

    def azure(status: int, code: str) -> HttpResponseError:
        e = HttpResponseError(message=f"{code} ({status})")
        e.status_code, e.error_code = status, code
        return e

    busy, refused = azure(503, "ServerBusy"), azure(403, "AuthorizationPermissionMismatch")
    assert is_transient(busy) and is_throttled(busy) and not is_transient(refused) and not is_throttled(refused)
    assert is_not_found(azure(404, "BlobNotFound")) and not is_transient(azure(404, "BlobNotFound"))
    gone = storage_error("az://c/k", azure(404, "ContainerNotFound"), {"az": {"account_name": "acct"}})
    assert isinstance(gone, BucketNotFound) and str(gone).startswith("az://c: the container does not exist "
                                                                     "(account acct)")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "from-env")  # (adlfs's variables, when no option names it)
    assert "does not exist (account from-env)" in str(storage_error("az://c/k", azure(404, "ContainerNotFound")))
    slow, bad = HttpError({"code": 429, "message": "rateLimitExceeded"}), HttpError({"code": 401, "message": "no"})
    assert is_transient(slow) and is_throttled(slow) and not is_transient(bad)
    denied = storage_error("gs://b/k", OSError("Forbidden: b/o/k\nno access"))
    assert isinstance(denied, StorageAccessDenied) and "403 Forbidden" in str(denied) and '"token"' in str(denied)
    assert "401 Unauthorized" in str(storage_error("gs://b/k", bad))
