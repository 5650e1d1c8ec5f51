"""The node's cache: on many nodes, read the object store at most once per node, however many passes.

Every pass re-deals the pool over all ranks (plan.py), so a node reads a different 1/K of the pool in each pass
(K nodes). What a node reads goes through one cache folder on its local disk (`--cache-dir`, shared by the node's
processes through cache.py's claims), and a **filler** per rank fetches, in the background, what that rank will
read later in the run, ahead of the rank's own reader:

- `NodeFiller`: a thread in DataLoader worker 0 of every rank (the main process without workers), running a
  `ReadAhead` in fill mode over the rank's items from the resume step on, skipping the items the rank's reader
  has already planned (its `frontier`). It has its own Fetcher (the same streamed, resumed, adaptive GETs),
  holds at most the worker's read-ahead bytes in memory, and stores each range as soon as it arrives. Ranges
  the node holds or another process is fetching are skipped, so each range reaches the node's cache once. It
  works in the background: while the rank's reader waits for data, it sends no new requests.
- Readers consult the cache first. A range that another process of the node is fetching is **waited for**,
  not fetched again: waiting costs at most that fetch's time (claims are taken when a GET is sent and end when
  its bytes are stored), while fetching it too would break "once per node"; a claim whose process died is
  ignored, so a reader never waits on a fetch that cannot finish.
- Cost: each node reads the union of the samples its ranks read over the run: for E passes on K nodes about
  K (1 - (1 - 1/K)^E) pool bytes in all, at most min(E, K) x the pool, and mostly during pass 1.

When the pool does not fit the cache (`CacheShare`): passes deal samples uniformly, so no part of the pool is
read more often than another, and a least-recently-used cache smaller than the pool evicts most entries before
their next use (a write for every miss, for a hit rate of about cache/pool). The node keeps a fixed share
instead: the longest prefix of the pool's units (the plan's canonical order: seeded shard order per source)
that fits; only those shards are cached and filled, the others are read from storage each time they come up.
Same hit rate, nothing evicted, nothing written twice. Not chosen: dealing later passes so that each node reads
its own cached share. That makes which samples a global batch holds depend on the number of nodes, so a run
could no longer resume on another world size with the same batches (plan.py's guarantee).

`storage_summary` gives the run's expected object-store bytes under this policy (`python -m stream_ssl.plan
... --nodes K --cache-size SIZE --json`, and the run summary); `node_from_env` says which node a process is on.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from shard_tools.storage import redact
from stream_ssl.data.plan import Plan
from stream_ssl.data.readahead import DEFAULT_READ_AHEAD, ReadAhead
from stream_ssl.data.reader import ShardReader

IDX_BYTES_PER_SAMPLE = 128  # room kept in the cache for the shards' .idx files (~85 bytes a sample of 3 members)
HEADROOM = 0.95  # the share fills at most this part of the cache (entries are sized from index.json estimates)


# ----------------------------------------------------------------------------------------------------------
# Which node.


@dataclass(frozen=True)
class Node:
    rank: int  # node rank, 0 .. nodes - 1
    nodes: int
    local_rank: int  # process on this node, 0 .. local_world_size - 1
    local_world_size: int


def _int(env: Mapping[str, str], *names: str) -> tuple[int, str] | None:
    for name in names:
        value = env.get(name, "").split("(")[0].split(",")[0].strip()  # SLURM writes "8(x2)"
        if value:
            try:
                return int(value), name
            except ValueError:
                raise ValueError(f"environment variable {name}={env[name]!r} is not a number") from None
    return None


def node_from_env(env: Mapping[str, str] | None = None) -> Node:
    """This process's node from the launcher's environment: torchrun and `accelerate launch` set LOCAL_RANK,
    LOCAL_WORLD_SIZE, GROUP_RANK (the node) and GROUP_WORLD_SIZE; NODE_RANK, then SLURM's SLURM_NODEID /
    SLURM_NNODES / SLURM_LOCALID / SLURM_NTASKS_PER_NODE are used where those are missing (launch/nodes.py
    passes SLURM's node rank on as the machine rank). Without a launcher: node 0 of 1."""
    env = os.environ if env is None else env
    world = (_int(env, "WORLD_SIZE") or (1, ""))[0]
    if world <= 1:
        return Node(0, 1, 0, 1)  # one process (SLURM variables of an allocation say nothing about it)
    local = _int(env, "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")
    local_size = local[0] if local else world
    nodes = _int(env, "GROUP_WORLD_SIZE", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    node = _int(env, "GROUP_RANK", "NODE_RANK", "SLURM_NODEID")
    rank = _int(env, "RANK")
    out = Node(rank=node[0] if node else (rank[0] // max(1, local_size) if rank else 0),
               nodes=nodes[0] if nodes else max(1, world // max(1, local_size)),
               local_rank=(_int(env, "LOCAL_RANK", "SLURM_LOCALID") or (0, ""))[0],
               local_world_size=max(1, local_size))
    if not 0 <= out.rank < out.nodes or not 0 <= out.local_rank < out.local_world_size or world % out.nodes:
        raise ValueError(f"launcher environment: node {out.rank} of {out.nodes}, local rank {out.local_rank} of "
                         f"{out.local_world_size}, {world} processes (from "
                         f"{', '.join(n for _, n in filter(None, (node, nodes, local)))}) is not a valid node identity")
    return out


# ----------------------------------------------------------------------------------------------------------
# What the node keeps.


@dataclass(frozen=True)
class CacheShare:
    """The shards a node's cache keeps: every shard of the pool when the pool fits in `cache_bytes`, else the
    longest prefix of the pool's units that fits. Call it with (source, shard)."""

    shards: frozenset[tuple[int, int]]
    kept_bytes: float  # estimated bytes of the kept units
    pool_bytes: float

    @classmethod
    def of(cls, plan: Plan, cache_bytes: int) -> CacheShare:
        sizes = plan.pool_unit_bytes()
        samples = np.array([plan.sets[a].shards[b].samples
                            for a, b in zip(plan.unit_source.tolist(), plan.unit_shard.tolist())], dtype=float)
        need = np.cumsum(sizes + IDX_BYTES_PER_SAMPLE * samples)
        n = int(np.searchsorted(need, HEADROOM * cache_bytes, side="right"))
        shards = frozenset(zip(plan.unit_source[:n].tolist(), plan.unit_shard[:n].tolist()))
        return cls(shards, float(sizes[:n].sum()), float(sizes.sum()))

    def __call__(self, source: int, shard: int) -> bool:
        return (source, shard) in self.shards

    @property
    def fraction(self) -> float:
        return self.kept_bytes / self.pool_bytes if self.pool_bytes else 1.0


def pass_fractions(plan: Plan) -> list[float]:
    """The share of the pool each pass reads (1 for full passes, less for the partial last one)."""
    n, seen = plan.unique_samples, plan.samples_seen
    return [min(1.0, (seen - p * n) / n) for p in range(plan.last_pass + 1)]


def storage_summary(plan: Plan, nodes: int = 1, cache_bytes: int | None = None) -> dict:
    """Expected sample bytes the run reads from storage, with K = `nodes` nodes of world_size / K processes and
    a cache of `cache_bytes` per node (None or 0: no cache). Each pass deals every node 1/K of the pool at random,
    so a kept sample reaches a node's cache with probability 1 - prod_p (1 - f_p / K) (f_p: the share of the pool
    pass p reads) and is read from storage once there; samples outside the cache share are read every time."""
    if nodes < 1 or plan.world_size % nodes:
        raise ValueError(f"--world-size {plan.world_size} is not a multiple of --nodes {nodes} (K nodes of W/K "
                         "processes each)")
    f = pass_fractions(plan)
    share = CacheShare.of(plan, cache_bytes) if cache_bytes and plan.last_pass > 0 else None
    pool = float(plan.pool_unit_bytes().sum())
    kept = share.kept_bytes if share else 0.0
    reach = 1.0 - math.prod(1.0 - x / nodes for x in f)
    policy = "none" if share is None else "whole pool" if kept >= pool else "share"
    return {
        "nodes": nodes,
        "processes_per_node": plan.world_size // nodes,
        "cache_bytes_per_node": int(cache_bytes or 0),
        "cache_policy": policy,
        "cache_share": kept / pool if pool else 0.0,
        "object_store_bytes": int(nodes * kept * reach + (pool - kept) * sum(f)),
        "object_store_bytes_without_cache": int(pool * sum(f)),
        "object_store_bytes_estimated_from": "pool bytes from index.json, each pass dealt uniformly over nodes; "
                                             "sample bytes only (each node also reads every pool shard's .idx)",
    }


def describe_storage(s: dict) -> str:
    from shard_tools.quantities import format_bytes

    cache = {"none": "no cache", "whole pool": "the whole pool cached per node",
             "share": f"{s['cache_share']:.0%} of the pool cached per node"}[s["cache_policy"]]
    return (f"storage: ~{format_bytes(s['object_store_bytes'])} from the object store on {s['nodes']} node(s), "
            f"{cache} (~{format_bytes(s['object_store_bytes_without_cache'])} without a cache)")


# ----------------------------------------------------------------------------------------------------------
# The filler.


class ReaderWaits:
    """Whether a reader waited for data (more than `slack` seconds) since the last call: `stats` are its
    ReadStats."""

    def __init__(self, stats, slack: float = 0.01):
        self.stats, self.slack, self.seen = stats, slack, stats.wait_seconds

    def __call__(self) -> bool:
        now = self.stats.wait_seconds
        waited, self.seen = now - self.seen > self.slack, now
        return waited


class NodeFiller:
    """Fills the node's cache, on a background thread, with what `rank` reads from `start_step` on, ahead of
    the rank's own reader (`frontier()`: the step of the last item it planned). `reader` must be its own (its
    own Fetcher, its own cache claims), with the node's cache folder. `starving()`: whether the rank's reader
    waited for data lately (e.g. `ReaderWaits(its stats)`); the filler then holds its next requests back, so the
    reader gets the bandwidth. `stop()` ends it and closes the reader."""

    PAUSE = 0.05  # seconds between looks at a starving reader

    def __init__(self, reader: ShardReader, plan: Plan, rank: int, start_step: int = 0, parts: int = 1,
                 read_ahead_bytes: int = DEFAULT_READ_AHEAD, frontier: Callable[[], int] = lambda: -1,
                 starving: Callable[[], bool] = lambda: False):
        self.reader, self.starving = reader, starving
        items = (it for it in plan.worker_items(0, 1, start_step, parts) if it[0] > frontier())
        self.stream = ReadAhead(reader, plan, rank, items, parts, read_ahead_bytes, fill=True, max_pending=256)
        self.error = ""
        self.done = False
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="stream-ssl-fill", daemon=True)

    def start(self) -> NodeFiller:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            for _ in self.stream:
                while self.starving() and not self._stop.is_set():
                    time.sleep(self.PAUSE)  # (in-flight requests go on; no new ones)
                if self._stop.is_set() or self.reader.cache.full:
                    return
            self.done = True
        except Exception as e:  # noqa: BLE001 - the readers fetch what the filler did not; training goes on
            self.error = redact(f"{type(e).__name__}: {e}").replace("\n", " ")
            warnings.warn(f"node cache filler stopped: {self.error}; the readers fetch what it did not bring",
                          stacklevel=1)
        finally:
            self.stream.close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()
        self.reader.close()
