"""The diversity controller: a pure, deterministic description of what every rank reads, for the whole run.

Vocabulary (docs/design.md): budget C = samples seen; unique samples N = the pool; passes E = C / N.

- Pool: N samples split over the sources by `mix` weights (default: proportional to size) with a
  house-monotone apportionment (sequential Sainte-Lague), then taken per source as a seeded prefix of
  that source's shards plus a partial last shard. Neither the shard order nor the apportionment sequence
  depends on N, so the pool for N1 < N2 is a subset of the pool for N2 (nested pools), also with a mix.
- Stream: floor(C / N) full passes and one partial pass, each a fresh seeded permutation of the pool's
  units (shard slices), laid end to end. The partial pass is a prefix of its permutation. Where a step
  straddles the boundary between two passes, the units that end the earlier pass in that step are moved
  out of the start of the next pass (when the pool has enough units), so no step holds a sample twice
  when N >= G.
- Steps: the stream's first `steps x G` positions (G = world_size x batch_size, steps = C // G) are used;
  the dropped rest is the stream's last C mod G samples (< one global batch), so every rank takes the same
  number of full batches.
- Mixing (the deterministic shuffle buffer): the steps inside one pass are grouped in windows of
  `shuffle_window` steps. A window's stream positions are cut into blocks of `shuffle_block` samples, the
  blocks are put in a seeded order, and step i of the window takes samples [iG, (i+1)G) of that block
  sequence. Rank r takes the samples [rB, (r+1)B) of its step, then puts them in a seeded order of its own
  (the in-worker shuffle). Every block is a contiguous run of a shard, so reads stay ranged and sequential.
  A window of 8 steps mixes samples up to 8 global batches apart, and every pass brings a sample new batch
  mates: with the default block of at most G/16 samples it keeps at most ~1/16 of them from one pass to the
  next. The default block is also at most ~4 MB of samples (from the sets' mean sample size in index.json):
  a block is one ranged read when several readers share a window, and 4 MB is worth its request latency.
  Windows never cross a pass boundary (a step that straddles one is read in stream order), so mixing cannot
  put two passes' copies of a sample in one step. `shuffle_block=0` switches mixing off:
  step j is then positions [jG, (j+1)G) in stream order.
- The global batch of a step (as a set) depends on G, the seed and the data only: a run can resume on another world
  size with the same global batch and see the same samples at every step. With gradient accumulation,
  plan the per-rank batch of one optimizer step and split it into micro-batches (`rank_slices(step, rank,
  part, parts)`): 8 ranks x 32 and 4 ranks x (2 x 32) then see the same samples.
- Workers: within a rank, worker k of K produces steps k, k+K, ... (the order a DataLoader collects them
  in), so the data does not depend on the number of workers.

Resume is a step number: a step's samples are located in O(units + window blocks) without reading
anything that came before.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from shard_tools.quantities import format_bytes, format_count, parse_count, plural
from shard_tools.shardset import ShardSet
from shard_tools.storage import is_url

# Seed-stream tags: pool selection, pass permutations, window block orders and in-batch orders never share
# random numbers.
_POOL, _PASS, _WINDOW, _ORDER = 1, 2, 3, 4
DEFAULT_SHUFFLE_WINDOW = 8
DEFAULT_SHUFFLE_BLOCK = None  # auto: G / 16 samples, at most ~4 MB (world-size independent: a function of G, data)
BLOCK_BYTES = 4_000_000  # a default block holds about this much: one read worth its latency (S3: 1-4 MB+)


class PlanError(ValueError):
    """A plan setting that cannot work. `setting` is its name here (and in the Python API and YAML files):
    `str()` reads `budget_samples 48 is smaller ...`; a command names its flag instead (`as_flag`)."""

    def __init__(self, setting: str, rest: str):
        super().__init__(setting + rest)
        self.setting, self.rest = setting, rest

    def as_flag(self) -> str:
        return "--" + self.setting.replace("_", "-") + self.rest


def _count(setting: str, text, available: int | None) -> int:
    try:
        return parse_count(text, available, setting)
    except ValueError as e:
        raise PlanError(setting, str(e)[len(setting):]) from None


def auto_shuffle_block(global_batch: int, sample_bytes: float | None = None) -> int:
    """Blocks of G/16 samples: a sample shares at most ~1/16 of its batch with its own block (the mates it keeps
    across passes); and at most BLOCK_BYTES of samples of `sample_bytes` (64 samples when it is unknown)."""
    cap = 64 if not sample_bytes else max(1, math.ceil(BLOCK_BYTES / sample_bytes))
    return max(1, min(cap, global_batch // 16))


@dataclass(frozen=True)
class Slice:
    """Samples [start, stop) of one shard of one source; `epoch` is the pass of the stream it belongs to."""

    source: int
    shard: int
    start: int
    stop: int
    epoch: int = field(default=0, compare=False)

    def __len__(self) -> int:
        return self.stop - self.start


def parse_mix(text: str | None) -> dict[str, float] | None:
    """`real=0.7,generated=0.3` -> {'real': 0.7, 'generated': 0.3}."""
    if not text:
        return None
    mix = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, weight = part.partition("=")
        if not sep or not name.strip():
            raise PlanError("mix", f": expected name=weight, got {part!r}")
        try:
            w = float(weight)
        except ValueError:
            raise PlanError("mix", f": weight of {name.strip()!r} is not a number: {weight!r}") from None
        if not math.isfinite(w) or w < 0:
            raise PlanError("mix", f": weight of {name.strip()!r} must be >= 0, got {weight!r}")
        if name.strip() in mix:
            raise PlanError("mix", f": {name.strip()!r} given twice")
        mix[name.strip()] = w
    return mix or None


def split_counts(total: int, weights: list[float]) -> list[int]:
    """Split `total` into integers proportional to `weights`, house-monotonically.

    Sequential Sainte-Lague (Webster): seat k (0-based) of source i has priority (k + 1/2) / w_i and the
    `total` lowest priorities win, ties going to the lower index. The seats for total + 1 always include
    those for total, which is what makes pools nested across N when several sources are mixed (a
    largest-remainder split can take a sample away from one source when N grows: the Alabama paradox).
    Exact rational arithmetic; O(sources^2 log total).
    """
    ws = [Fraction(w) for w in weights]
    if any(w < 0 for w in ws) or not any(w > 0 for w in ws):
        raise ValueError("weights must be >= 0 with a positive sum")
    if total < 0:
        raise ValueError("total must be >= 0")
    if total == 0:
        return [0] * len(ws)
    live = [i for i, w in enumerate(ws) if w > 0]
    half = Fraction(1, 2)

    def seats_at_most(t: Fraction) -> int:
        return sum(max(0, math.floor(t * ws[i] + half)) for i in live)

    threshold = None
    for i in live:  # the lowest priority of source i at which `total` seats are filled
        lo, hi = 0, total
        while lo < hi:
            mid = (lo + hi) // 2
            if seats_at_most((mid + half) / ws[i]) >= total:
                hi = mid
            else:
                lo = mid + 1
        t = (lo + half) / ws[i]
        threshold = t if threshold is None or t < threshold else threshold
    counts = [0] * len(ws)
    for i in live:
        counts[i] = max(0, math.ceil(threshold * ws[i] - half))  # seats with priority below the threshold
    left = total - sum(counts)
    for i in live:  # ties at the threshold, lower index first
        x = threshold * ws[i] - half
        if left > 0 and x >= 0 and x.denominator == 1:
            counts[i] += 1
            left -= 1
    assert left == 0, "apportionment did not fill every seat"
    return counts


@dataclass(frozen=True)
class Plan:
    sets: tuple[ShardSet, ...]
    unique_samples: int
    budget_samples: int
    world_size: int
    num_workers: int
    batch_size: int  # per rank
    seed: int
    per_source: tuple[int, ...]
    # The pool's units in canonical order, as parallel arrays.
    unit_source: np.ndarray = field(repr=False)
    unit_shard: np.ndarray = field(repr=False)
    unit_stop: np.ndarray = field(repr=False)  # every unit starts at sample 0 of its shard
    unit_bytes: np.ndarray | None = field(default=None, repr=False)  # estimated bytes per unit
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW
    shuffle_block: int = 64
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict:  # DataLoader workers get a copy: memoised layouts and locks stay behind
        state = dict(self.__dict__)
        state["_memo"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    # ----------------------------------------------------------------------------------------------
    # Arithmetic.

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    @property
    def steps(self) -> int:
        return self.budget_samples // self.global_batch

    @property
    def samples_seen(self) -> int:
        return self.steps * self.global_batch

    @property
    def dropped(self) -> int:
        return self.budget_samples - self.samples_seen

    @property
    def passes(self) -> float:
        return self.budget_samples / self.unique_samples

    @property
    def full_passes(self) -> int:
        return self.budget_samples // self.unique_samples

    @property
    def last_pass(self) -> int:
        """Index of the last pass any step reads from."""
        return max(0, self.samples_seen - 1) // self.unique_samples

    @property
    def shuffled(self) -> bool:
        return self.shuffle_block > 0

    @property
    def remote(self) -> bool:
        """Whether any shard set is read through a URL (an object store, HTTP) rather than as local files."""
        return any(is_url(s.url) for s in self.sets)

    # ----------------------------------------------------------------------------------------------
    # Memoised layouts (a reader moves forward, so a handful of entries is enough).

    def _memoised(self, kind: str, key: int, build, keep: int):
        memo = self._memo.setdefault(kind, {})
        lock = self._memo.setdefault("lock", threading.Lock())
        with lock:
            value = memo.get(key)
            if value is not None:
                return value
        value = build()
        with lock:
            memo[key] = value
            while len(memo) > keep:
                memo.pop(next(iter(memo)))
        return value

    def pass_layout(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit order, cumulative sample counts with a leading 0) of pass p."""
        return self._memoised("pass", p, lambda: self._pass_layout(p), keep=4)

    def _pass_layout(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        sizes, n, g = self.unit_stop, self.unique_samples, self.global_batch
        order = _raw_order(self.seed, p, len(sizes))
        t = p * n % g  # samples of pass p-1 in the step that straddles the boundary
        if p > 0 and t and g <= n:
            # Keep the straddling step free of repeats: units that end pass p-1 inside that step move just
            # behind the units that start pass p in it. Only the start of the order changes, never the units
            # that end pass p, so the next boundary sees the order's plain end (no recursion over passes).
            prev = _raw_order(self.seed, p - 1, len(sizes))
            prev_end = np.cumsum(sizes[prev])
            tail = np.zeros(len(sizes), dtype=bool)
            tail[prev[int(np.searchsorted(prev_end, n - t, side="right")):]] = True
            clash = tail[order]
            if clash.any():
                ok_end = np.cumsum(np.where(clash, 0, sizes[order]))
                i = int(np.searchsorted(ok_end, g - t, side="left")) + 1  # units looked at to fill the step
                t_next = (p + 1) * n % g
                end = np.cumsum(sizes[order])
                keep_from = int(np.searchsorted(end, n - t_next, side="right")) if t_next else len(order)
                if i <= min(keep_from, len(order)):
                    head = order[:i]
                    order = np.concatenate([head[~clash[:i]], head[clash[:i]], order[i:]])
        cum = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes[order], out=cum[1:])
        return order, cum

    def window_layout(self, p: int, k: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(block order, cumulative block lengths with a leading 0) of mixing window k of pass p."""
        return self._memoised("window", (p, k), lambda: self._window_layout(p, k, steps), keep=4)

    def _window_layout(self, p: int, k: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
        length = steps * self.global_batch
        blocks = -(-length // self.shuffle_block)
        order = np.random.default_rng([self.seed, _WINDOW, p, k]).permutation(blocks)
        lengths = np.full(blocks, self.shuffle_block, dtype=np.int64)
        lengths[-1] = length - (blocks - 1) * self.shuffle_block
        cum = np.zeros(blocks + 1, dtype=np.int64)
        np.cumsum(lengths[order], out=cum[1:])
        return order, cum

    # ----------------------------------------------------------------------------------------------
    # Where samples are.

    def slices(self, begin: int, end: int) -> list[Slice]:
        """The samples at stream positions [begin, end), as shard slices in stream order."""
        if not 0 <= begin <= end <= self.samples_seen:
            raise IndexError(f"stream range [{begin}, {end}) outside [0, {self.samples_seen})")
        out: list[Slice] = []
        n = self.unique_samples
        pos = begin
        while pos < end:
            p, offset = divmod(pos, n)
            order, cum = self.pass_layout(p)
            k = int(np.searchsorted(cum, offset, side="right")) - 1
            while pos < end and k < len(order):
                u = int(order[k])
                start = offset - int(cum[k])
                take = min(int(self.unit_stop[u]) - start, end - pos)
                out.append(Slice(int(self.unit_source[u]), int(self.unit_shard[u]), start, start + take, p))
                pos += take
                offset += take
                k += 1
        return out

    def window(self, step: int) -> tuple[int, int, int, int]:
        """(pass, window index, first step, steps) of the mixing window holding `step`; a step that is not mixed
        (mixing off, or across a pass boundary) is a window of its own, with index -1."""
        g, n = self.global_batch, self.unique_samples
        p = step * g // n
        if not self.shuffled or ((step + 1) * g - 1) // n != p:
            return p, -1, step, 1
        # Windows never cross a pass boundary: they tile the steps that lie inside pass p.
        first = -(-p * n // g)
        last = min((p + 1) * n // g, self.steps)
        k = (step - first) // self.shuffle_window
        start = first + k * self.shuffle_window
        return p, k, start, min(self.shuffle_window, last - start)

    def step_ranges(self, step: int, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
        """Stream ranges [begin, end) holding samples [lo, hi) of global step `step`, in batch order."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside [0, {self.steps})")
        g = self.global_batch
        hi = g if hi is None else hi
        p, k, start, steps = self.window(step)
        if k < 0:
            return [(step * g + lo, step * g + hi)]
        i = step - start
        order, cum = self.window_layout(p, k, steps)
        base = start * g
        a, z = i * g + lo, i * g + hi
        j = int(np.searchsorted(cum, a, side="right")) - 1
        out: list[tuple[int, int]] = []
        while a < z:
            take = min(int(cum[j + 1]) - a, z - a)
            begin = base + int(order[j]) * self.shuffle_block + (a - int(cum[j]))
            if out and out[-1][1] == begin:
                out[-1] = (out[-1][0], begin + take)
            else:
                out.append((begin, begin + take))
            a += take
            j += 1
        return out

    def _part(self, rank: int, part: int, parts: int) -> tuple[int, int]:
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} outside [0, {self.world_size})")
        if parts < 1 or self.batch_size % parts or not 0 <= part < parts:
            raise ValueError(f"part {part} of {parts}: the batch of {self.batch_size} must split into equal parts")
        size = self.batch_size // parts
        lo = rank * self.batch_size + part * size
        return lo, lo + size

    def rank_slices(self, step: int, rank: int, part: int = 0, parts: int = 1) -> list[Slice]:
        """What `rank` reads for global step `step`, as shard slices in batch order (before `rank_order`).

        With `parts` > 1, only micro-batch `part` of the rank's batch (gradient accumulation: the plan's
        batch_size is the per-rank batch of one optimizer step, split into `parts` micro-batches)."""
        lo, hi = self._part(rank, part, parts)
        out: list[Slice] = []
        for begin, end in self.step_ranges(step, lo, hi):
            for s in self.slices(begin, end):
                last = out[-1] if out else None
                if last and (last.source, last.shard, last.stop, last.epoch) == (s.source, s.shard, s.start, s.epoch):
                    out[-1] = Slice(s.source, s.shard, last.start, s.stop, s.epoch)
                else:
                    out.append(s)
        return out

    def rank_order(self, step: int, rank: int, part: int = 0, parts: int = 1) -> np.ndarray | None:
        """The in-worker shuffle: the order in which the samples of `rank_slices(step, rank, part, parts)` are
        yielded (sample i of the batch is the `order[i]`-th sample of the slices). None when mixing is off."""
        if not self.shuffled:
            return None
        lo, hi = self._part(rank, part, parts)
        key = [self.seed, _ORDER, step, rank] + ([part, parts] if parts > 1 else [])
        return np.random.default_rng(key).permutation(hi - lo)

    def rank_samples(self, step: int, rank: int, part: int = 0, parts: int = 1) -> list[tuple[int, int, int]]:
        """(source, shard, sample index) of every sample `rank` gets at `step`, in the order it is yielded."""
        items = [(s.source, s.shard, i) for s in self.rank_slices(step, rank, part, parts)
                 for i in range(s.start, s.stop)]
        order = self.rank_order(step, rank, part, parts)
        return items if order is None else [items[int(j)] for j in order]

    def worker_steps(self, worker: int, num_workers: int, start_step: int = 0) -> range:
        """Steps that DataLoader worker `worker` of `num_workers` produces when iteration starts at `start_step`."""
        return range(start_step + worker, self.steps, max(1, num_workers))

    def worker_items(self, worker: int, num_workers: int, start_step: int = 0, parts: int = 1) -> Iterator:
        """(step, part) micro-batches that worker `worker` produces from `start_step` on: micro-batch u = step x
        parts + part goes to worker u mod num_workers, the order a DataLoader collects items in."""
        k = max(1, num_workers)
        return (divmod(u, parts) for u in range(start_step * parts + worker, self.steps * parts, k))

    def shards_used(self) -> list[tuple[ShardSet, np.ndarray]]:
        """(shard set, indices of its shards the pool reads from), per source: what must exist to train."""
        return [(s, np.unique(self.unit_shard[self.unit_source == i])) for i, s in enumerate(self.sets)]

    # ----------------------------------------------------------------------------------------------
    # Reports.

    def summary(self) -> dict:
        unit_bytes = self.pool_unit_bytes()
        pool_bytes = float(unit_bytes.sum())
        return {
            "sources": [
                {"name": s.name, "source": s.source, "url": s.url, "available": s.num_samples, "unique": n,
                 "shards_used": int(np.count_nonzero(self.unit_source == i))}
                for i, (s, n) in enumerate(zip(self.sets, self.per_source))
            ],
            "unique_samples": self.unique_samples,
            "budget_samples": self.budget_samples,
            "diversity": self.unique_samples / self.budget_samples,
            "passes": self.passes,
            "full_passes": self.full_passes,
            "partial_pass_samples": self.budget_samples % self.unique_samples,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "global_batch": self.global_batch,
            "steps": self.steps,
            "samples_per_rank": self.steps * self.batch_size,
            "samples_seen": self.samples_seen,
            "dropped": self.dropped,
            "pool_units": len(self.unit_stop),
            "pool_bytes": int(pool_bytes),
            "bytes_to_read": int(pool_bytes * self.samples_seen / self.unique_samples),
            "bytes_per_rank": int(pool_bytes * self.samples_seen / self.unique_samples / self.world_size),
            "cache_needed_bytes": int(pool_bytes) if self.last_pass > 0 else 0,
            "bytes_estimated_from": "shard sizes in index.json (partial shards pro rata)",
            "shuffle_window": self.shuffle_window,
            "shuffle_block": self.shuffle_block,
            "seed": self.seed,
        }

    def pool_unit_bytes(self) -> np.ndarray:
        """Bytes of each pool unit (canonical order): shard sizes from index.json, partial shards pro rata."""
        if self.unit_bytes is not None:
            return self.unit_bytes
        return _estimate_unit_bytes(self.sets, self.unit_source, self.unit_shard, self.unit_stop)

    def describe(self) -> str:
        s = self.summary()
        lines = [
            f"pool: {format_count(s['unique_samples'])} unique samples "
            f"(diversity D = N/C = {s['diversity']:.4g}) for a budget of {format_count(s['budget_samples'])}",
        ]
        for src in s["sources"]:
            lines.append(f"  {src['name']} [{src['source']}]: {src['unique']} of {src['available']} "
                         f"from {src['shards_used']} shards")
        mixing = (f"blocks of {self.shuffle_block} mixed over windows of {self.shuffle_window} steps"
                  if self.shuffled else "off")
        lines += [
            f"passes: {s['passes']:.3f} ({s['full_passes']} full + {s['partial_pass_samples']} samples)",
            f"steps: {s['steps']} of global batch {s['global_batch']} "
            f"({plural(s['world_size'], 'rank')} x {s['batch_size']}); {s['samples_per_rank']} samples per rank",
            f"dropped: {s['dropped']} samples" + (" (the budget is not a multiple of the global batch)"
                                                  if s["dropped"] else ""),
            f"mixing: {mixing}",
            f"reads: ~{format_bytes(s['bytes_to_read'])} (~{format_bytes(s['bytes_per_rank'])} per rank); "
            f"cache for repeats: ~{format_bytes(s['cache_needed_bytes'])}",
        ]
        if s["unique_samples"] < s["global_batch"]:
            lines.append("warning: fewer unique samples than one global batch: batches repeat samples")
        if s["samples_seen"] < s["unique_samples"]:
            lines.append(f"warning: the budget sees only {s['samples_seen']} of the {s['unique_samples']} "
                         "unique samples (less than one pass)")
        return "\n".join(lines)


def _raw_order(seed: int, p: int, units: int) -> np.ndarray:
    return np.random.default_rng([seed, _PASS, p]).permutation(units)


def _shard_arrays(s: ShardSet) -> tuple[np.ndarray, np.ndarray]:
    samples = np.fromiter((x.samples for x in s.shards), dtype=np.int64, count=len(s.shards))
    nbytes = np.fromiter((x.bytes for x in s.shards), dtype=np.int64, count=len(s.shards))
    return samples, nbytes


def _estimate_unit_bytes(sets, unit_source, unit_shard, unit_stop) -> np.ndarray:
    out = np.zeros(len(unit_stop))
    for i, s in enumerate(sets):
        mask = unit_source == i
        if mask.any():
            samples, nbytes = _shard_arrays(s)
            sh = unit_shard[mask]
            out[mask] = nbytes[sh] * unit_stop[mask] / np.maximum(samples[sh], 1)
    return out


def make_plan(
    sets: list[ShardSet] | tuple[ShardSet, ...],
    unique_samples: int | str | float,
    budget_samples: int | str,
    mix: dict[str, float] | str | None = None,
    world_size: int = 1,
    num_workers: int = 0,
    batch_size: int = 256,
    seed: int = 0,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
    shuffle_block: int | None = DEFAULT_SHUFFLE_BLOCK,
) -> Plan:
    """Build the plan. Pure: the same arguments always give the same plan.

    `shuffle_block=0` turns mixing off (steps read the stream in order), None picks `auto_shuffle_block(G)`;
    see the module docstring.
    """
    sets = tuple(sets)
    if not sets:
        raise ValueError("no shard sets given")
    n, c = _counts(sets, unique_samples, budget_samples)
    if world_size < 1 or batch_size < 1 or num_workers < 0:
        raise ValueError("world_size and batch_size must be >= 1, num_workers >= 0")
    if shuffle_block is None:
        shuffle_block = auto_shuffle_block(world_size * batch_size, _mean_sample_bytes(sets))
    if shuffle_window < 1 or shuffle_block < 0:
        raise ValueError("shuffle_window must be >= 1 and shuffle_block >= 0 (0: no mixing)")
    if c < world_size * batch_size:
        raise PlanError("budget_samples", f" {c} is smaller than one global batch of {world_size * batch_size} "
                                          f"({plural(world_size, 'rank')} x {batch_size} per rank)")
    per_source = _per_source(sets, n, mix)
    src, shard, stop, nbytes = _pool_units(sets, per_source, seed)
    return Plan(sets=sets, unique_samples=n, budget_samples=c, world_size=world_size, num_workers=num_workers,
                batch_size=batch_size, seed=seed, per_source=tuple(per_source), unit_source=src, unit_shard=shard,
                unit_stop=stop, unit_bytes=nbytes, shuffle_window=shuffle_window, shuffle_block=shuffle_block)


def _mean_sample_bytes(sets: tuple[ShardSet, ...]) -> float | None:
    samples = sum(s.num_samples for s in sets)
    total = sum(x.bytes for s in sets for x in s.shards)
    return total / samples if samples and total else None


def _counts(sets: tuple[ShardSet, ...], unique_samples, budget_samples) -> tuple[int, int]:
    """(N, C) as counts; N at most what the sets hold."""
    available = sum(s.num_samples for s in sets)
    n = _count("unique_samples", unique_samples, available)
    c = _count("budget_samples", budget_samples, None)
    if n > available:
        where = ", ".join(s.url for s in sets)
        raise PlanError("unique_samples", f" {n} is more than the {available} samples available in {where}"
                        + (f" ({', '.join(f'{s.name}: {s.num_samples}' for s in sets)})" if len(sets) > 1 else ""))
    return n, c


def _per_source(sets: tuple[ShardSet, ...], n: int, mix: dict[str, float] | str | None) -> list[int]:
    """The N unique samples split over the sources by the mix weights (default: proportional to size)."""
    mix = parse_mix(mix) if isinstance(mix, str) else mix
    if mix:
        names = [s.name for s in sets]
        unknown = set(mix) - set(names) - {s.source for s in sets}
        if unknown:
            raise PlanError("mix", f" names {sorted(unknown)} match no shard set; sets are {names} "
                                   f"(sources {sorted({s.source for s in sets})})")
        weights = [mix.get(s.name, mix.get(s.source, 0.0)) for s in sets]
        if sum(weights) <= 0:
            raise PlanError("mix", " weights must sum to a positive number")
    else:
        weights = [float(s.num_samples) for s in sets]
    per_source = split_counts(n, weights)
    for s, k in zip(sets, per_source):
        if k > s.num_samples:
            raise PlanError("mix", f" asks {k} of the {n} unique samples from {s.name} ({s.url}), which has only "
                                   f"{s.num_samples}; lower N (the unique samples) or that weight")
    return per_source


def _pool_units(sets: tuple[ShardSet, ...], per_source: list[int], seed: int) -> tuple[np.ndarray, ...]:
    """The pool's units (source, shard, samples taken from its start, estimated bytes): per source a seeded
    prefix of its shards, the last one partial."""
    src, shard, stop, nbytes = [], [], [], []
    for i, (s, k) in enumerate(zip(sets, per_source)):
        order = np.random.default_rng([seed, _POOL, i]).permutation(len(s.shards))
        if k == 0:
            continue
        samples, sizes = _shard_arrays(s)
        order = order[samples[order] > 0]  # empty shards hold nothing to take
        cum = np.cumsum(samples[order])
        used = int(np.searchsorted(cum, k, side="left")) + 1  # shards needed to hold k samples
        chosen = order[:used]
        take = samples[chosen].copy()
        take[-1] -= int(cum[used - 1]) - k  # the partial last shard
        src.append(np.full(used, i, dtype=np.int64))
        shard.append(chosen.astype(np.int64))
        stop.append(take)
        nbytes.append(sizes[chosen] * take / np.maximum(samples[chosen], 1))
    return tuple(np.concatenate(x) for x in (src, shard, stop, nbytes))
