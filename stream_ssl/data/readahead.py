"""Read ahead for one rank (or one loader worker): the reads of the coming items are planned together.

Items are steps, or (step, part) micro-batches; for each, the plan gives shard slices. `ReadAhead`:
1. takes the items ahead of the consumer in rounds of about `round_bytes` (sizes from index.json), while the
   bytes it holds or has in flight stay under `read_ahead_bytes` (the memory bound; at most LOCAL_READ_AHEAD
   when every shard is a local file);
2. merges a round's slices per shard into runs of touching samples: one reader per rank turns a mixing
   window's scattered blocks back into a few long ranges, and a run serves every item whose samples lie in
   it (bytes delivered to later steps wait in memory); runs are cut into GETs of at most `request_bytes`;
3. hands the GETs to the Fetcher in the order the items need them, at a concurrency it adapts to what it
   measures: at least enough requests to hide the time to first byte behind the transfers, one more each
   time the consumer waited while requests were queued, half as many after a throttling answer;
4. yields items in order, each one's samples in the plan's order; bytes are dropped once the last item that
   needs them is yielded.
With a DiskCache, what the cache holds is read from it (on reader threads), what another process of the node
is fetching is waited for, and what this reader fetches for the cache is claimed first and stored as soon as it
arrives. In `fill` mode (the node filler, nodecache.py) it only fills the cache: ranges held or claimed by
others are skipped, nothing is handed to a consumer. The mixing (which samples a step holds) is the plan's;
only the reads are grouped.
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from stream_ssl.data.cache import MISSING
from stream_ssl.data.plan import Plan, Slice
from stream_ssl.data.reader import ShardReader

DEFAULT_READ_AHEAD = 256 << 20  # bytes per process: ~1 s of a fast GPU's intake, fine on any training node
# Shards that are all local files have no latency to hide: bytes ahead of the consumer only cost fresh memory
# (measured: a pass read 1.5-2x faster in CPU time at 16 MiB than at 256 MiB). 16 MiB still covers 5 GB/s at
# 3 ms, the latency of a network filesystem mounted locally.
LOCAL_READ_AHEAD = 16 << 20
# The first mixing window's reads (what the first item waits for: its samples lie anywhere in the window) go in
# GETs of at most this much, all sent at once, and every other GET of the first fill once one of them is done:
# the first batch then waits for one time to first byte and a slice of the window per connection, not for
# whole-shard GETs (at 20 MB/s per connection, 13 MB take 0.65 s), nor shares the link with the rest of the fill.
OPENING_REQUEST_BYTES = 4 << 20


@dataclass
class Segment:
    """Samples [first, stop) of one shard: one GET (or one cache read)."""

    source: int
    shard: int
    first: int
    stop: int
    nbytes: int
    need: int  # position of the first item that needs it (submission order)
    store: bool = False  # claimed for the disk cache: stored as soon as it arrives
    local: bool = False  # through the cache: held there, or being fetched by another process of the node
    future: Future | None = None
    stored: Future | None = None  # done once a claimed segment is stored
    refs: int = 0
    bad: dict | None = None  # its samples whose tar headers do not match the .idx (checked once, at first use)


@dataclass
class Pending:
    item: object
    parts: list[tuple[Slice, list[Segment]]] = field(default_factory=list)


class ReadAhead:
    """Yields (item, samples in yield order) for one rank. Iterate once; `close()` (or leaving the loop) stops
    it. `parts`: items are (step, part) micro-batches of a batch split into `parts`. `fill`: only fill the
    disk cache (yields (item, []) once the item's fetches are stored); `max_pending`: items planned ahead at
    most (a filler that finds everything held would otherwise plan the whole run at once). `frontier` is the
    step of the last item planned."""

    def __init__(self, reader: ShardReader, plan: Plan, rank: int, items, parts: int = 1,
                 read_ahead_bytes: int = DEFAULT_READ_AHEAD, round_bytes: int | None = None,
                 max_concurrency: int = 64, fill: bool = False, max_pending: int | None = None):
        self.reader, self.plan, self.rank, self.parts = reader, plan, rank, parts
        self.items = iter(items)
        self.budget = max(1, int(read_ahead_bytes))
        if not fill and not plan.remote:
            self.budget = min(self.budget, LOCAL_READ_AHEAD)
        self.round_bytes = round_bytes or max(1, self.budget // 4)
        self.max_concurrency = max_concurrency
        self.fill, self.max_pending = fill, max_pending
        self.frontier = -1
        self.pending: deque[Pending] = deque()
        self.live: dict[tuple[int, int], list[Segment]] = {}
        self.held = 0  # bytes of live segments (in flight, or read and not yet consumed)
        self.position = 0  # items planned so far
        self.opening = None  # items of the first mixing window (small GETs), known once the first round is planned
        self.exhausted = False
        self._peek = None  # the next item, when a round looked at it
        self._seen = reader.stats.snapshot()
        self._avg = [np.array([s.bytes / max(1, s.samples) for s in st.shards]) for st in plan.sets]

    # ----------------------------------------------------------------------------------------------
    # Planning.

    def _where(self, item) -> tuple[int, int]:
        return (int(item), 0) if isinstance(item, (int, np.integer)) else (int(item[0]), int(item[1]))

    def _fill(self) -> None:
        opening = self.opening is None
        while not self.exhausted and (self.held < self.budget or not self.pending) and \
                (self.max_pending is None or len(self.pending) < self.max_pending):
            if not self._plan_round():
                self.exhausted = True
        if opening:  # the first window's GETs at once, then (once one of them is done) every GET of the fill
            segs = [seg for segs in self.live.values() for seg in segs if not seg.local]
            first = [seg for seg in segs if seg.need < self.opening]
            self._widen(len(first))
            if first:
                first[0].future.add_done_callback(lambda _: self._widen(len(segs)))

    def _widen(self, gets: int) -> None:
        fetcher = self.reader.fetcher
        fetcher.set_concurrency(max(fetcher.concurrency, min(self.max_concurrency, gets)))

    def _plan_round(self) -> bool:
        """Take the next items (about `round_bytes` of them) and send their reads."""
        round_items: list[Pending] = []
        estimate = 0.0
        while estimate < self.round_bytes or self._same_window(round_items):
            item = self._next_item()
            if item is None:
                break
            step, part = self._where(item)
            pieces = self.plan.rank_slices(step, self.rank, part, self.parts)
            round_items.append(Pending(item, [(p, []) for p in pieces]))
            estimate += sum(len(p) * self._avg[p.source][p.shard] for p in pieces)
        if not round_items:
            return False
        self.frontier = self._where(round_items[-1].item)[0]
        self.reader.load_indexes((p.source, p.shard) for r in round_items for p, _ in r.parts)
        if self.opening is None:
            self.opening = self._opening(round_items)
        new = self._new_segments(round_items)
        for seg in sorted(new, key=lambda s: s.need):
            self._submit(seg)
        for r in round_items:
            r.parts = [(p, self._attach(p)) for p, _ in r.parts]
        self.pending.extend(round_items)
        return True

    def _opening(self, round_items: list[Pending]) -> int:
        """How many items (from the first) belong to the mixing window of the first one (1 when it is not mixed)."""
        first = self.plan.window(self._where(round_items[0].item)[0])[:2]
        if first[1] == -1:
            return 1
        return next((n for n, r in enumerate(round_items) if self.plan.window(self._where(r.item)[0])[:2] != first),
                    len(round_items))

    def _next_item(self):
        item, self._peek = (self._peek, None) if self._peek is not None else (next(self.items, None), None)
        return item

    def _same_window(self, round_items: list[Pending]) -> bool:
        """Whether the next item belongs to the mixing window of the round's last one (a round ends with a
        window: the window's blocks, scattered over its range, are only contiguous all together)."""
        if not round_items:
            return False
        if self._peek is None:
            self._peek = next(self.items, None)
        if self._peek is None:
            return False
        last, upcoming = self._where(round_items[-1].item)[0], self._where(self._peek)[0]
        return self.plan.window(last)[:2] == self.plan.window(upcoming)[:2] != (self.plan.window(last)[0], -1)

    def _new_segments(self, round_items: list[Pending]) -> list[Segment]:
        """Segments for what the round needs and no live segment covers: touching ranges merged per shard."""
        wanted: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for n, r in enumerate(round_items, start=self.position):
            for p, _ in r.parts:
                wanted.setdefault((p.source, p.shard), []).append((p.start, p.stop, n))
        self.position += len(round_items)
        out: list[Segment] = []
        for (source, shard), ranges in wanted.items():
            early = _merge([r for r in ranges if r[2] < self.opening])  # (their own runs: small GETs)
            late = _minus(_merge([r for r in ranges if r[2] >= self.opening]), early)
            for a, b, need in early + late:
                for lo, hi in self._uncovered(source, shard, a, b):
                    out += self._cut(source, shard, lo, hi, need)
        return out

    def _uncovered(self, source: int, shard: int, a: int, b: int) -> list[tuple[int, int]]:
        out, pos = [], a
        for seg in sorted(self.live.get((source, shard), []), key=lambda s: s.first):
            if seg.stop <= pos or seg.first >= b:
                continue
            if seg.first > pos:
                out.append((pos, seg.first))
            pos = max(pos, seg.stop)
        if pos < b:
            out.append((pos, b))
        return out

    def _cut(self, source: int, shard: int, a: int, b: int, need: int) -> list[Segment]:
        """[a, b) as segments: runs the cache holds (or another process is fetching) as one segment each, read
        through the cache; the rest cut at sample boundaries into GETs of at most `request_bytes`, claimed for
        the cache where the reader keeps this shard. In fill mode only what this reader claimed."""
        reader, bounds = self.reader, self.reader.boundaries(source, shard)
        cached = reader.caches(source, shard)
        keep = cached and reader.keeps(source, shard)
        if self.fill and not keep:
            return []
        runs = reader.cache_cover(source, shard, a, b) if cached else [(a, b, MISSING)]
        out = []
        for lo, hi, state in runs:
            if state != MISSING:
                out += [] if self.fill else [self._segment(source, shard, lo, hi, need, local=True)]
                continue
            limit = reader.fetcher.policy.request_bytes
            pieces = _pieces(bounds, lo, hi, min(limit, OPENING_REQUEST_BYTES) if need < self.opening else limit)
            granted = reader.cache.claim(reader.shard_key(source, shard), pieces) if keep else [False] * len(pieces)
            for (x, y), mine in zip(pieces, granted):
                if mine or not keep:
                    out.append(self._segment(source, shard, x, y, need, store=mine))
                elif not self.fill:  # claimed by another process just now (or the cache filled up)
                    out.append(self._segment(source, shard, x, y, need, local=True))
        return out

    def _segment(self, source: int, shard: int, first: int, stop: int, need: int, **kind) -> Segment:
        bounds = self.reader.boundaries(source, shard)
        return Segment(source, shard, first, stop, int(bounds[stop] - bounds[first]), need, **kind)

    def _submit(self, seg: Segment) -> None:
        reader = self.reader
        if seg.local:  # from local disk, or once another process has stored it (fetched after all if not)
            seg.future = reader.submit_cached(seg.source, seg.shard, seg.first, seg.stop,
                                              reader.keeps(seg.source, seg.shard))
        else:
            url = self.plan.sets[seg.source].shard_url(seg.shard)
            seg.future = reader.fetcher.submit(url, reader.boundaries(seg.source, seg.shard), seg.first, seg.stop)
            if seg.store:
                seg.stored = reader.store_when_fetched(seg.future, seg.source, seg.shard, seg.first, seg.stop)
        self.live.setdefault((seg.source, seg.shard), []).append(seg)
        self.held += seg.nbytes

    def _attach(self, piece: Slice) -> list[Segment]:
        segs = [s for s in self.live.get((piece.source, piece.shard), [])
                if s.first < piece.stop and piece.start < s.stop]
        for s in segs:
            s.refs += 1
        return sorted(segs, key=lambda s: s.first)

    # ----------------------------------------------------------------------------------------------
    # Delivery.

    def __iter__(self):
        try:
            while True:
                self._fill()
                if not self.pending:
                    return
                head = self.pending.popleft()
                if self.fill:
                    self._drain(head)
                    yield head.item, []
                    continue
                samples = self._assemble(head)
                step, part = self._where(head.item)
                order = self.plan.rank_order(step, self.rank, part, self.parts)
                if order is not None:
                    samples = [samples[int(k)] for k in order]
                yield head.item, samples
        finally:
            self.close()

    def _assemble(self, head: Pending) -> list[dict]:
        waited = 0.0
        samples: list[dict] = []
        for piece, segs in head.parts:
            for seg in segs:
                if not seg.future.done():
                    t0 = time.perf_counter()
                    seg.future.result()
                    waited += time.perf_counter() - t0
                data = seg.future.result()
                if seg.bad is None:  # the headers of the whole segment at once, not per item
                    seg.bad = self.reader.mismatches(data, seg.source, seg.shard, seg.first, seg.stop)
                lo, hi = max(piece.start, seg.first), min(piece.stop, seg.stop)
                samples += self.reader.split(data, seg.source, seg.shard, lo, hi, data_first=seg.first, bad=seg.bad)
                self._release(seg)
        self.reader._count(wait_seconds=waited)
        self._tune(waited=waited > 0)
        return samples

    def _drain(self, head: Pending) -> None:
        """Fill mode: wait until the item's fetches arrived and are stored (the bytes held stay within the
        budget however slow the disk), then let them go."""
        waited = False
        for _, segs in head.parts:
            for seg in segs:
                waited |= not seg.future.done()
                seg.future.result()
                if seg.stored is not None:
                    seg.stored.result()
                self._release(seg)
        self._tune(waited=waited)

    def _release(self, seg: Segment) -> None:
        seg.refs -= 1
        if seg.refs == 0:
            self.live[(seg.source, seg.shard)].remove(seg)
            self.held -= seg.nbytes
            seg.future = None  # the bytes go with it

    def _tune(self, waited: bool = False) -> None:
        """Concurrency from measurements: enough GETs to hide the time to first byte behind transfers; +1
        when the consumer waited with requests queued; halved after throttling."""
        fetcher = self.reader.fetcher
        now = self.reader.stats.snapshot()
        requests = now["requests"] - self._seen["requests"]
        c = fetcher.concurrency
        if now["throttled"] > self._seen["throttled"]:
            c = max(1, c // 2)
            self._seen = now
        elif requests >= 4:
            ttfb = (now["ttfb_seconds"] - self._seen["ttfb_seconds"]) / requests
            busy = (now["request_seconds"] - self._seen["request_seconds"]) / requests
            c = max(c, min(self.max_concurrency, math.ceil(2 * ttfb / max(busy - ttfb, 1e-3)) + 1))
            self._seen = now
        if waited and fetcher.queued() and c < self.max_concurrency:
            c += 1
        fetcher.set_concurrency(c)

    def close(self) -> None:
        for head in self.pending:
            for _, segs in head.parts:
                for seg in segs:
                    if seg.future is not None:
                        seg.future.cancel()
        self.pending.clear()
        self.live.clear()
        self.held = 0


def _merge(ranges: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Touching or overlapping sample ranges merged: (start, stop, first item that needs it)."""
    out: list[list[int]] = []
    for a, b, need in sorted(ranges):
        if out and a <= out[-1][1]:
            last = out[-1]
            last[1], last[2] = max(last[1], b), min(last[2], need)
        else:
            out.append([a, b, need])
    return [tuple(r) for r in out]


def _minus(runs: list[tuple[int, int, int]], cover: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The parts of `runs` (start, stop, need) that no run of `cover` holds."""
    out = []
    for a, b, need in runs:
        for c, d, _ in cover:
            if c < b and a < d:
                if a < c:
                    out.append((a, c, need))
                a = max(a, d)
        if a < b:
            out.append((a, b, need))
    return out


def _pieces(bounds: np.ndarray, a: int, b: int, limit: int) -> list[tuple[int, int]]:
    """Samples [a, b) cut into runs of at most `limit` bytes (whole samples; one sample is never split)."""
    out = []
    while a < b:
        fits = int(np.searchsorted(bounds, bounds[a] + limit, side="right")) - 1
        end = max(a + 1, min(b, fits))
        out.append((a, end))
        a = end
    return out
