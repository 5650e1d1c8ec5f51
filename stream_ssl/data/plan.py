"""The diversity controller: a pure, deterministic description of what every rank reads, for the whole run.

Vocabulary (see DESIGN.md): budget C = samples seen; unique samples N = the pool; passes E = C / N.

- Pool: N samples taken per source (by `mix` weights, default proportional to size) as a seeded prefix
  of that source's shards plus a partial last shard. The shard order does not depend on N, so the pool for
  N1 < N2 is a subset of the pool for N2 (nested pools).
- Stream: floor(C / N) full passes and one partial pass, each a fresh seeded permutation of the pool's
  units (shard slices), laid end to end. The partial pass is a prefix of its permutation.
- Steps: the stream is cut into global batches of G = world_size x batch_size samples; step j covers
  stream positions [jG, (j+1)G) and rank r reads [jG + rB, jG + (r+1)B). So every rank takes the same
  number of full batches, the samples dropped to make that true are the stream's last C mod G (< one
  global batch), and a global batch is the same set of samples whatever the world size: a run can resume
  on another world size with the same global batch.
- Workers: within a rank, worker k of K produces steps k, k+K, ... (the order a DataLoader collects them
  in), so the data does not depend on the number of workers.
Resume is a step number: any step's samples are located in O(units) without reading what came before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shard_tools.shardset import ShardSet
from stream_ssl.numbers import format_count, parse_count

_POOL, _PASS = 1, 2  # seed-stream tags: pool selection and pass permutations never share random numbers


@dataclass(frozen=True)
class Slice:
    """Samples [start, stop) of one shard of one source."""

    source: int
    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def parse_mix(text: str | None) -> dict[str, float] | None:
    """`real=0.7,generated=0.3` -> {'real': 0.7, 'generated': 0.3}."""
    if not text:
        return None
    mix = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        if not sep:
            raise ValueError(f"--mix: expected name=weight, got {part!r}")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--mix: weight of {name!r} is not a number: {weight!r}") from None
    return mix


def split_counts(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of `total` into integers proportional to `weights`."""
    w = np.asarray(weights, dtype=float)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return [int(c) for c in counts]


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
    _layouts: dict = field(default_factory=dict, repr=False, compare=False)

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

    def pass_layout(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit order, cumulative sample counts with a leading 0) of pass p."""
        layout = self._layouts.get(p)
        if layout is None:
            if len(self._layouts) >= 2:  # a reader moves forward: keep this pass and the one before
                self._layouts.pop(min(self._layouts))
            layout = self._layouts[p] = _pass_layout(self.seed, p, self.unit_stop)
        return layout

    def slices(self, begin: int, end: int) -> list[Slice]:
        """The samples at stream positions [begin, end), as shard slices in reading order."""
        if not 0 <= begin <= end <= self.samples_seen:
            raise IndexError(f"stream range [{begin}, {end}) outside [0, {self.samples_seen})")
        out: list[Slice] = []
        n = self.unique_samples
        pos = begin
        while pos < end:
            p, offset = divmod(pos, n)
            order, cum = self.pass_layout(p)
            k = int(np.searchsorted(cum, offset, side="right")) - 1
            u = int(order[k])
            start = offset - int(cum[k])
            take = min(int(self.unit_stop[u]) - start, end - pos)
            out.append(Slice(int(self.unit_source[u]), int(self.unit_shard[u]), start, start + take))
            pos += take
        return out

    def rank_slices(self, step: int, rank: int) -> list[Slice]:
        """What `rank` reads for global step `step`."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside [0, {self.steps})")
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} outside [0, {self.world_size})")
        begin = step * self.global_batch + rank * self.batch_size
        return self.slices(begin, begin + self.batch_size)

    def worker_steps(self, worker: int, num_workers: int, start_step: int = 0) -> range:
        """Steps that DataLoader worker `worker` of `num_workers` produces when iteration starts at `start_step`."""
        return range(start_step + worker, self.steps, max(1, num_workers))

    def summary(self) -> dict:
        unit_bytes = self._unit_bytes()
        pool_bytes = float(unit_bytes.sum())
        return {
            "sources": [
                {"name": s.name, "source": s.source, "url": s.url, "available": s.num_samples, "unique": n}
                for s, n in zip(self.sets, self.per_source)
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
            "bytes_to_read": int(pool_bytes * self.samples_seen / self.unique_samples),
            "cache_needed_bytes": int(pool_bytes) if self.full_passes >= 1 and self.passes > 1 else 0,
            "seed": self.seed,
        }

    def _unit_bytes(self) -> np.ndarray:
        """Approximate bytes of each unit: its share of the shard's bytes."""
        out = np.empty(len(self.unit_stop))
        for i, (s, sh, stop) in enumerate(zip(self.unit_source, self.unit_shard, self.unit_stop)):
            info = self.sets[s].shards[sh]
            out[i] = info.bytes * stop / max(info.samples, 1)
        return out

    def describe(self) -> str:
        s = self.summary()
        lines = [
            f"pool: {format_count(s['unique_samples'])} unique samples "
            f"(diversity D = N/C = {s['diversity']:.4g}) for a budget of {format_count(s['budget_samples'])}",
        ]
        for src in s["sources"]:
            lines.append(f"  {src['name']} [{src['source']}]: {src['unique']} of {src['available']}")
        lines += [
            f"passes: {s['passes']:.3f} ({s['full_passes']} full + {s['partial_pass_samples']} samples)",
            f"steps: {s['steps']} of global batch {s['global_batch']} "
            f"({s['world_size']} ranks x {s['batch_size']}); {s['samples_per_rank']} samples per rank",
            f"dropped: {s['dropped']} samples (budget not a multiple of the global batch)",
            f"reads: ~{s['bytes_to_read'] / 1e6:.1f} MB; cache for repeats: ~{s['cache_needed_bytes'] / 1e6:.1f} MB",
        ]
        if s["unique_samples"] < s["global_batch"]:
            lines.append("warning: fewer unique samples than one global batch: batches repeat samples")
        return "\n".join(lines)


def _pass_layout(seed: int, p: int, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([seed, _PASS, p]).permutation(len(sizes))
    cum = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes[order], out=cum[1:])
    return order, cum


def make_plan(
    sets: list[ShardSet] | tuple[ShardSet, ...],
    unique_samples: int | str | float,
    budget_samples: int | str,
    mix: dict[str, float] | str | None = None,
    world_size: int = 1,
    num_workers: int = 0,
    batch_size: int = 256,
    seed: int = 0,
) -> Plan:
    """Build the plan. Pure: the same arguments always give the same plan."""
    sets = tuple(sets)
    if not sets:
        raise ValueError("no shard sets given")
    available = sum(s.num_samples for s in sets)
    n = parse_count(unique_samples, available, "--unique-samples")
    c = parse_count(budget_samples, None, "--budget-samples")
    if n > available:
        raise ValueError(f"--unique-samples {n} is more than the {available} samples available in "
                         f"{', '.join(s.url for s in sets)}")
    if world_size < 1 or batch_size < 1 or num_workers < 0:
        raise ValueError("world_size and batch_size must be >= 1, num_workers >= 0")
    if c < world_size * batch_size:
        raise ValueError(f"--budget-samples {c} is smaller than one global batch "
                         f"({world_size} ranks x {batch_size} = {world_size * batch_size})")

    mix = parse_mix(mix) if isinstance(mix, str) else mix
    if mix:
        names = [s.name for s in sets]
        unknown = set(mix) - set(names) - {s.source for s in sets}
        if unknown:
            raise ValueError(f"--mix names {sorted(unknown)} match no shard set; sets are {names}")
        weights = [mix.get(s.name, mix.get(s.source, 0.0)) for s in sets]
        if sum(weights) <= 0:
            raise ValueError("--mix weights must sum to a positive number")
    else:
        weights = [float(s.num_samples) for s in sets]
    per_source = split_counts(n, weights)
    for s, k in zip(sets, per_source):
        if k > s.num_samples:
            raise ValueError(f"--mix asks {k} samples of {s.name}, which has only {s.num_samples}")

    src, shard, stop = [], [], []
    for i, (s, k) in enumerate(zip(sets, per_source)):
        order = np.random.default_rng([seed, _POOL, i]).permutation(len(s.shards))
        left = k
        for j in order:
            if left == 0:
                break
            take = min(left, s.shards[j].samples)
            if take == 0:
                continue
            src.append(i)
            shard.append(int(j))
            stop.append(take)
            left -= take
    return Plan(
        sets=sets,
        unique_samples=n,
        budget_samples=c,
        world_size=world_size,
        num_workers=num_workers,
        batch_size=batch_size,
        seed=seed,
        per_source=tuple(per_source),
        unit_source=np.asarray(src, dtype=np.int64),
        unit_shard=np.asarray(shard, dtype=np.int64),
        unit_stop=np.asarray(stop, dtype=np.int64),
    )
