"""The planned, exact sample stream inside any training loop: `StreamingDataset` and `StreamingDataLoader`.

    from stream_ssl import StreamingDataLoader, StreamingDataset

    dataset = StreamingDataset("s3://bucket/shards/pool", unique_samples="1M", budget_samples="128M",
                               batch_size=256, transform=my_torchvision_transform)
    loader = StreamingDataLoader(dataset, num_workers=8)
    for batch in loader:                  # {"image": (256, 3, H, W), "label": (256,), "__key__": [...], ...}
        ...
    state = loader.state_dict()           # after k batches: a new loader given this state yields batch k + 1

What the stream guarantees is the plan's (stream_ssl/data/plan.py): N unique samples (`unique_samples`) repeated
in reshuffled passes to fill a budget of C samples seen (`budget_samples`), every rank the same number of full
batches of `batch_size`, the same batches for any number of loader workers, and a position that is one
integer, so a loader resumes exactly (`state_dict`) without reading what came before. The reads are the
trainer's: ranged, merged and read ahead at object-store latency, with a node cache for repeated passes
(`cache_dir`).

`StreamingDataset` is the public face of the stream; the trainer's datasets (loader.PlanDataset and the GPU
decoders' EncodedDataset) are subclasses that turn each step's samples into augmented view batches instead.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from shard_tools.shardset import IMAGE_EXTS
from stream_ssl.data.cache import DiskCache
from stream_ssl.data.nodecache import CacheShare, NodeFiller, ReaderWaits
from stream_ssl.data.plan import DEFAULT_SHUFFLE_BLOCK, DEFAULT_SHUFFLE_WINDOW, Plan, make_plan
from stream_ssl.data.readahead import DEFAULT_READ_AHEAD, ReadAhead
from stream_ssl.data.reader import ShardReader
from stream_ssl.data.rng import TRANSFORM, batch_rng

DECODES = (None, "pil", "tensor")
UNDECODABLE = (OSError, ValueError, SyntaxError)  # what PIL raises for a damaged or unsupported image


class TooManySkipped(RuntimeError):
    """More undecodable samples than the skip threshold allows."""


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image member")


def sample_label(sample: dict) -> int:
    raw = sample.get("cls")
    return int(raw) if raw is not None else -1


def cache_bound(plan: Plan, cache_dir: str | Path | None, cache_size: int | None = None) -> int | None:
    """The node cache's bound: `cache_size`, else enough for the repeated part of the pool (+20%), at most 80% of
    the free space where the cache lives; None without a cache."""
    if not cache_dir:
        return None
    if cache_size:
        return cache_size
    import shutil

    need = int(plan.summary()["cache_needed_bytes"] * 1.2) + (64 << 20)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return max(64 << 20, min(need, int(shutil.disk_usage(cache_dir).free * 0.8)))


def distributed_position(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): as given, else torch.distributed's when it is initialized, else the launcher's
    environment (RANK / WORLD_SIZE from torchrun and accelerate, SLURM_PROCID / SLURM_NTASKS under srun)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        found = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        env = os.environ
        found = (int(env.get("RANK", env.get("SLURM_PROCID", 0))),
                 int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1))))
    rank, world_size = (found[0] if rank is None else rank), (found[1] if world_size is None else world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return rank, world_size


class StreamingDataset(IterableDataset):
    """This rank's share of a planned stream of samples, in plan order (a `torch.utils.data.IterableDataset`).

    Args:
        data: shard sets, as `--data` takes them: a comma-separated string or a list of shard-set folders or URLs
            (s3://, gs://, http(s)://), folders of plain WebDataset tars, single tars, brace patterns
            (`pool-{000000..000099}.tar`; local ones are indexed on the fly).
        unique_samples: N, the distinct samples that feed the stream: a count (`500K`, `1M`) or a fraction of the
            data (`0.1`, `10%`).
        budget_samples: C, the samples the stream delivers over all ranks: a count (`128M`).
        batch_size: samples per batch on each rank; every rank gets C // (world_size x batch_size) full batches.
        seed: the seed of the pool, the passes' orders, the mixing and the per-sample transform seeds.
        rank, world_size: this process's place; default from torch.distributed, else RANK / WORLD_SIZE (or SLURM's).
        mix: pool weights per source kind or set name, `{"real": 0.7, "generated": 0.3}` or `"real=0.7,..."`
            (default: proportional to size).
        decode: None (the image's bytes), "pil" (an RGB PIL image) or "tensor" (uint8, 3 x H x W); images over
            64 Mi pixels are refused.
        transform: a callable applied to each decoded image in the loader worker (a torchvision transform, say).
            Before each call, torch's and Python's random generators are seeded from (seed, step, rank, position
            in the batch), so a resumed loader and one with another number of workers draw the same augmentations.
        cache_dir, cache_size: a node-local folder that keeps what repeated passes read again (default size: what
            the plan's repeats need); storage_options: fsspec options for URLs (credentials, endpoint).
        skip_fraction: fail once more than this share of samples (past 32) cannot be decoded; an undecodable
            sample is replaced by another sample of its batch (batches stay full) and counted.

    Yields:
        dicts with `__key__`, `__set__` (the shard set's name), `__source__` (its source kind), `__url__` (the
        shard), `__step__` (the batch's index in the whole stream), `image`, and `label` (int, -1 for a sample
        without one) when any of the sets has labels.

    `plan` is the plan (`plan.summary()` and `print(plan.describe())` are what `stream-ssl plan` prints);
    `len(dataset)` is the samples this rank has left. Use it with `StreamingDataLoader` (or a DataLoader with
    `batch_size=dataset.batch_size`); `start_step` is where it starts (the loader's state sets it).

    Example (the README's pool of 4000 images: N = 400 seen 80 times, in 500 batches of 64):
        >>> ds = StreamingDataset("shards/pool", unique_samples="10%", budget_samples="32K", batch_size=64)
        >>> ds.plan.summary()["passes"], len(ds) // ds.batch_size
        (80.0, 500)
    """

    yields_batches = False  # the trainer's subclasses yield one whole batch per item

    def __init__(self, data: str | Sequence[str], *, unique_samples: str | int | float,
                 budget_samples: str | int | float, batch_size: int, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, mix: str | dict | None = None, decode: str | None = "pil",
                 transform: Callable | None = None, cache_dir: str | Path | None = None, cache_size: int | None = None,
                 storage_options: dict | None = None, shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
                 shuffle_block: int | None = DEFAULT_SHUFFLE_BLOCK, read_ahead_bytes: int = DEFAULT_READ_AHEAD,
                 local_reads: str = "mmap", skip_fraction: float = 0.01):
        from shard_tools.inputs import open_shard_sets

        if decode not in DECODES:
            raise ValueError(f"decode must be one of None, 'pil', 'tensor'; got {decode!r}")
        if decode is not None:  # the decoders, loaded here once rather than in every loader worker
            import stream_ssl.data.augment  # noqa: F401
        rank, world_size = distributed_position(rank, world_size)
        if isinstance(mix, dict):
            mix = ",".join(f"{k}={v}" for k, v in mix.items())
        sets = open_shard_sets(data, storage_options)
        plan = make_plan(sets, unique_samples, budget_samples, mix, world_size, 1, batch_size, seed,
                         shuffle_window=shuffle_window, shuffle_block=shuffle_block)
        self.setup(plan, rank, storage_options=storage_options, seed=seed, cache_dir=cache_dir, cache_size=cache_size,
                   read_ahead_bytes=read_ahead_bytes, skip_fraction=skip_fraction, local_reads=local_reads)
        self.decode, self.transform = decode, transform
        self.labeled = any("cls" in (s.meta.get("fields") or []) or s.labels for s in plan.sets)

    def setup(self, plan: Plan, rank: int, start_step: int = 0, storage_options: dict | None = None, seed: int = 0,
              cache_dir: str | Path | None = None, cache_size: int | None = None,
              read_ahead_bytes: int = DEFAULT_READ_AHEAD, skip_fraction: float = 0.01, skip_grace: int = 32,
              retries: int = 8, backoff: float = 0.2, micro_batches: int = 1, cache_local: bool = False,
              cache_fill: bool = True, local_reads: str = "mmap") -> None:
        """The stream of `plan` for `rank` (what the constructor does once it has a plan; the trainer's subclasses
        start here)."""
        if not 0 <= rank < plan.world_size:
            raise ValueError(f"rank {rank} outside [0, {plan.world_size})")
        if micro_batches < 1 or plan.batch_size % micro_batches:
            raise ValueError(f"the per-rank batch {plan.batch_size} does not split into {micro_batches} "
                             "micro-batches")
        self.plan, self.rank, self.micro_batches = plan, rank, micro_batches
        self.start_step = start_step
        self.storage_options, self.seed, self.cache_local = storage_options, seed, cache_local
        self.cache_dir = str(cache_dir) if cache_dir else None
        self.cache_size = cache_bound(plan, self.cache_dir, cache_size)
        self.share = CacheShare.of(plan, self.cache_size) if self.cache_dir else None
        self.cache_fill = bool(cache_fill and self.cache_dir and plan.last_pass > 0)
        self.read_ahead_bytes, self.local_reads = read_ahead_bytes, local_reads
        self.skip_fraction, self.skip_grace = skip_fraction, skip_grace
        self.retries, self.backoff = retries, backoff

    @property
    def start_step(self) -> int:
        return self._start_step

    @start_step.setter
    def start_step(self, step: int) -> None:
        if not 0 <= step <= self.plan.steps:
            raise ValueError(f"start_step {step} outside [0, {self.plan.steps}]")
        self._start_step = step

    @property
    def batch_size(self) -> int:
        """Samples per batch of one rank (per micro-batch in the trainer's subclasses)."""
        return self.plan.batch_size // self.micro_batches

    def __len__(self) -> int:
        """What is left from `start_step`: samples (batches, for the trainer's subclasses)."""
        items = max(0, self.plan.steps - self.start_step) * self.micro_batches
        return items if self.yields_batches else items * self.batch_size

    # -- reading ---------------------------------------------------------------------------------------

    def make_reader(self) -> ShardReader:
        cache = DiskCache(self.cache_dir, self.cache_size) if self.cache_dir else None
        return ShardReader(self.plan.sets, self.storage_options, retries=self.retries, backoff=self.backoff,
                           cache=cache, plan=self.plan, cache_local=self.cache_local, share=self.share,
                           local_reads=self.local_reads)

    def __iter__(self):
        """This worker's items (step k, k + K, ... of K workers), read ahead; worker 0 also runs the node filler."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = self.make_reader()
        items = self.plan.worker_items(worker, workers, self.start_step, self.micro_batches)
        budget = self.read_ahead_bytes // max(1, workers)
        stream = ReadAhead(reader, self.plan, self.rank, items, parts=self.micro_batches, read_ahead_bytes=budget)
        filler = None
        if self.cache_fill and worker == 0:
            filler = NodeFiller(self.make_reader(), self.plan, self.rank, self.start_step, self.micro_batches,
                                budget, frontier=lambda: stream.frontier, starving=ReaderWaits(reader.stats)).start()
        readers = [reader] + ([filler.reader] if filler else [])
        seen = skipped = 0
        try:
            before = _counters(readers)
            for (step, micro), samples in stream:
                now = _counters(readers)
                outs, bad = self.emit(step, micro, samples, {k: now[k] - before[k] for k in now}, worker)
                before, seen, skipped = now, seen + len(samples), skipped + bad
                self.check_skips(seen, skipped, worker)
                yield from outs
        finally:
            stream.close()
            if filler is not None:
                filler.stop()
            reader.close()

    def check_skips(self, seen: int, skipped: int, worker: int) -> None:
        if skipped > self.skip_grace + self.skip_fraction * seen:
            raise TooManySkipped(
                f"rank {self.rank} worker {worker}: {skipped} of {seen} samples could not be decoded "
                f"(threshold {self.skip_grace} + {self.skip_fraction:.1%}); last: {self._last_error}. "
                "Check the shard set (shard-tools verify) or raise the threshold.")

    _last_error = ""

    # -- samples ---------------------------------------------------------------------------------------

    def emit(self, step: int, micro: int, samples: list[dict], io_counts: dict, worker: int) -> tuple[list, int]:
        """What one step's samples become, and how many of them could not be decoded: here one output per sample
        (the trainer's subclasses: one batch of views, with the storage counters `io_counts`)."""
        outs, bad = [], []
        for i, s in enumerate(samples):
            try:
                outs.append(self.sample(s, step))
            except UNDECODABLE as e:
                self._last_error = f"{s.get('__url__', '?')} {s.get('__key__', '?')}: {e}"
                bad.append(i)
        if not outs:
            raise RuntimeError(f"step {step}: no decodable image among {len(samples)} samples")
        for j in range(len(bad)):  # batches stay full: another sample of the same batch takes the place
            outs.append(dict(outs[j % (len(samples) - len(bad))]))
        if self.transform is not None:
            for i, out in enumerate(outs):
                _seed_transform(self.seed, step, self.rank, i)
                out["image"] = self.transform(out["image"])
        return outs, len(bad)

    def sample(self, s: dict, step: int) -> dict:
        if "__error__" in s:
            raise ValueError(s["__error__"])
        src = self.plan.sets[s["__source__"]]
        out = {"__key__": s["__key__"], "__set__": src.name, "__source__": src.source, "__url__": s["__url__"],
               "__step__": step, "image": decode_image(image_bytes(s), self.decode)}
        if self.labeled:
            out["label"] = sample_label(s)
        return out


def decode_image(data, decode: str | None):
    """`data` as bytes, an RGB PIL image or a uint8 (3, H, W) tensor (the decoders' pixel cap applies)."""
    if decode is None:
        return bytes(data)
    from stream_ssl.data.augment import decode_rgb

    im = decode_rgb(bytes(data) if isinstance(data, memoryview) else data)
    return im if decode == "pil" else torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


def _seed_transform(seed: int, step: int, rank: int, position: int) -> None:
    value = int(batch_rng(seed, step, rank, position, TRANSFORM).integers(2**63))
    torch.manual_seed(value)
    random.seed(value)


def _counters(readers: list[ShardReader]) -> dict:
    snaps = [r.stats.snapshot() for r in readers]
    return {k: sum(s[k] for s in snaps) for k in snaps[0]}


def collate_samples(samples: list[dict]) -> dict:
    """A batch of sample dicts: tensors and numbers stacked (torch's default collate), anything else (PIL images,
    bytes, strings) kept as a list."""
    return {key: _collated([s[key] for s in samples]) for key in samples[0]}


def _collated(values: list):
    stacked = isinstance(values[0], (torch.Tensor, np.ndarray, int, float)) and not isinstance(values[0], bool)
    return default_collate(values) if stacked else values


class InTransit:
    """A batch of `collate_samples` on its way from a loader worker: plain numbers (the step, the label) as numpy
    arrays, which travel inside the pickled batch, made tensors in the training process (`landed`). A tensor made
    in the worker travels in shared memory, at the price of a file descriptor passed over a socket for each
    tensor of each batch (about a millisecond on each side): worth it for images, not for 64 integers."""

    def __init__(self, batch: dict, numbers: list[str]):
        self.batch, self.numbers = batch, numbers

    def landed(self) -> dict:
        """The batch as `collate_samples` makes it (the same tensors: int64 or float64, as torch's collate)."""
        return {k: torch.from_numpy(v) if k in self.numbers else v for k, v in self.batch.items()}

    def pin_memory(self) -> dict:  # (the DataLoader's pin-memory thread)
        from torch.utils.data._utils.pin_memory import pin_memory

        return pin_memory(self.landed())


def collate_in_worker(samples: list[dict]) -> InTransit:
    """`collate_samples` for a loader worker: columns of plain ints or floats as numpy arrays (see InTransit)."""
    batch, numbers = {}, []
    for key in samples[0]:
        values = [s[key] for s in samples]
        kind = type(values[0])
        if kind in (int, float) and all(type(v) is kind for v in values):
            try:
                batch[key] = np.array(values, dtype=np.int64 if kind is int else np.float64)
                numbers.append(key)
                continue
            except OverflowError:  # (an int beyond int64: torch's collate says so)
                pass
        batch[key] = _collated(values)
    return InTransit(batch, numbers)


def worker_signals(worker_id: int) -> None:
    """A loader worker leaves stop signals to its training process. SIGINT (a terminal's Ctrl-C reaches the whole
    process group) and SIGUSR1 are ignored: the workers end when their loader shuts down, or when the training
    process dies. SIGTERM too, while the training process stops cleanly (stopping.shield_workers): SLURM signals
    every process of a job, and a worker dying of it would fail the step that finishes the run. Otherwise a
    SIGTERM ends the worker, as a DataLoader that shuts down its workers, or Python at exit, expects."""
    import signal

    from stream_ssl.stopping import worker_sigterm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, worker_sigterm)


class StreamingDataLoader(DataLoader):
    """The loader of a `StreamingDataset`: the plan's batches of this rank, in order, resumable exactly.

    Args:
        dataset: the StreamingDataset (its `batch_size` is the batch size: it is the plan's).
        num_workers, pin_memory, prefetch_factor, timeout, multiprocessing_context: as torch's DataLoader. The
            batches do not depend on the number of workers.
        collate_fn: makes a batch of the samples (default `collate_samples`: tensors and numbers stacked, PIL
            images, bytes and strings as lists; with workers, `collate_in_worker`, whose numbers become tensors
            here: the same batches).

    `len(loader)` is the batches left. `state_dict()` after k batches and `load_state_dict(state)` on a new
    loader (another number of workers allowed) continue with batch k + 1 of the same stream, as torchdata's
    StatefulDataLoader does; the state is a small dict of plain values.

    Example:
        >>> loader = StreamingDataLoader(dataset, num_workers=4)
        >>> for i, batch in enumerate(loader):
        ...     if i == 9:
        ...         state = loader.state_dict()
        ...         break
        >>> again = StreamingDataLoader(dataset, num_workers=2)
        >>> again.load_state_dict(state)   # yields batch 10 onwards
    """

    FORMAT = 1

    def __init__(self, dataset: StreamingDataset, *, num_workers: int = 0, collate_fn: Callable | None = None,
                 pin_memory: bool = False, prefetch_factor: int | None = None, timeout: float = 0,
                 multiprocessing_context=None):
        batched = dataset.yields_batches
        extra = {"prefetch_factor": prefetch_factor or 2, "persistent_workers": False} if num_workers > 0 else {}
        super().__init__(dataset, batch_size=None if batched else dataset.batch_size, num_workers=num_workers,
                         collate_fn=collate_fn or (_identity if batched else collate_in_worker if num_workers > 0
                                                   else collate_samples), pin_memory=pin_memory,
                         timeout=timeout, worker_init_fn=worker_signals if num_workers > 0 else None,
                         multiprocessing_context=multiprocessing_context, **extra)
        self._delivered = 0  # batches handed out since `start_step`

    def __len__(self) -> int:
        ds = self.dataset
        return max(0, ds.plan.steps - ds.start_step) * ds.micro_batches

    def __iter__(self):
        """The batches; when the loop ends early (an error, a break), the workers are shut down at once, not at
        interpreter exit, where killing them makes torch report a worker "killed by signal"."""
        self._delivered = 0
        batches = super().__iter__()
        try:
            for batch in batches:
                self._delivered += 1
                yield batch.landed() if isinstance(batch, InTransit) else batch
        finally:
            shutdown = getattr(batches, "_shutdown_workers", None)  # (torch's multi-process iterator)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict:
        """Where the stream stands: the next batch's position, and what identifies the plan."""
        ds = self.dataset
        return {"format": self.FORMAT, "batch": ds.start_step * ds.micro_batches + self._delivered,
                "plan": plan_identity(ds.plan)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict` of a loader over the same plan)."""
        ds = self.dataset
        if state.get("format") != self.FORMAT:
            raise ValueError(f"loader state format {state.get('format')!r}, this loader reads {self.FORMAT}")
        if state["plan"] != plan_identity(ds.plan):
            diff = {k: (v, plan_identity(ds.plan).get(k)) for k, v in state["plan"].items()
                    if plan_identity(ds.plan).get(k) != v}
            raise ValueError(f"the loader state is of another plan (saved vs now: {diff})")
        if state["batch"] % ds.micro_batches:
            raise ValueError("a state taken inside a step's micro-batches cannot be continued")
        ds.start_step, self._delivered = state["batch"] // ds.micro_batches, 0


def plan_identity(plan: Plan) -> dict:
    """What makes two plans the same stream for one rank's loader (plain values: a state to save anywhere)."""
    return {"sets": [s.url for s in plan.sets], "samples": [s.num_samples for s in plan.sets],
            "unique_samples": plan.unique_samples, "budget_samples": plan.budget_samples,
            "global_batch": plan.global_batch, "seed": plan.seed, "shuffle_window": plan.shuffle_window,
            "shuffle_block": plan.shuffle_block}


def _identity(batch):
    return batch

