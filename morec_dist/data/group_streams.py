"""Per-(objective, group) row streams over the group-partitioned layout ``by_group/``.

A prepared dataset holds, for every group column, the train rows partitioned by group
(``by_group/<column>/g=<gid>/part-*.parquet``, see docs/data-layer.md), each group's rows in
a uniformly random order (a hash of (row, layout seed)). This module owns how one rank reads
them:

- **Shares.** Group g's rows, concatenated over its files in manifest order, are one stream
  of n rows; rank r of R takes the contiguous slice ``[n*r//R, n*(r+1)//R)``, so the ranks'
  shares partition the group and each is read sequentially, a row group at a time, with
  column projection. A group with fewer rows than ranks (n < R) gives rank r the single row
  ``r % n``: every rank can serve every non-empty group, at the price of some rows being
  shared by several ranks (only for groups smaller than the world).
- **Passes.** A stream serves its share in passes; each pass visits every row of the share
  exactly once. Pass e permutes the share's row-group segments and shuffles the rows within
  each window of ``window_segments`` segments (pass 0 too, so the order depends on the
  training seed, not only the layout's), so memory stays at a few row groups per stream
  while the order changes every pass; decode, interleave and shuffle are one compiled pass
  (``kernels.shuffle_rows``). A share of at most ``in_memory_rows`` rows (a group smaller
  than a row group) is read once, held in memory, fully permuted every pass and gathered
  once per pass, then served by slicing. Permutations are a compiled Fisher-Yates keyed by
  a hash of (stream, pass, window) (``kernels.permutation``), or, for shares of at most
  ``TINY_SHARE_ROWS``, the sort order of 64-bit hashes of (stream, pass, window, row)
  (``hashed_permutations``), vectorised over passes, so a tiny group drawn thousands of
  times a step costs no Python loop per pass. Both are pure functions of the position.
- **Cursors.** A stream's position is (pass, offset): the whole state. ``peek`` / ``advance``
  serve rows from the cursor, wrapping to the next pass at the end of one.
- **Prefetch.** ``WindowPrefetcher`` reads, ahead of each stream's cursor, the next windows
  of data into the stream's cache; the consumer reads a missing window itself. What a
  stream serves is a pure function of its cursor, never of what was prefetched.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from morec_dist.data import kernels, schema, storage
from morec_dist.data.storage import StoragePath

IDS = ["user_id", "item_id"]
# seed-stream ids, disjoint from the reader's (reader.STREAM_*)
STREAM_PASS_ORDER = 10
STREAM_PASS_ROWS = 11
TINY_SHARE_ROWS = 64  # shares up to this size permute by sorted hashes, vectorised over passes


def open_row_groups(path: StoragePath) -> pq.ParquetFile:
    """A Parquet file read a row group at a time. Local: synchronously: with pre-buffering
    (pyarrow's default) each read is handed to Arrow's I/O thread and waited for, which cost
    about a quarter of the weighted blocks' time in a profile; a local file has no latency for
    it to hide. On an object store pre-buffering is what coalesces a row group's column chunks
    into few ranged GETs (one per row group, not one per column or page)."""
    return storage.parquet_file(path, pre_buffer=not storage.is_local(path))


class GroupLayoutError(ValueError):
    """The dataset has no group-partitioned layout for a column, or it is inconsistent."""


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


def _splitmix64_int(x: int) -> int:
    """``splitmix64`` of one value on Python ints (a numpy call per op costs ~1 us)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64: a cheap, well-mixed 64-bit hash."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_permutations(salts: np.ndarray, n: int) -> np.ndarray:
    """One permutation of range(n) per salt ([len(salts), n] int64): the order of the hashes
    of (salt, i). A pure function of (salt, n), vectorised over many passes at once, so a
    group much smaller than a block costs no Python loop per pass."""
    with np.errstate(over="ignore"):
        mixed = np.asarray(salts, dtype=np.uint64)[:, None] ^ splitmix64(np.arange(n, dtype=np.uint64))[None, :]
    return np.argsort(splitmix64(mixed), axis=1, kind="stable")


@dataclass(frozen=True)
class Segment:
    file: int  # index into the stream's file list
    row_group: int
    lo: int  # rows [lo, hi) of that row group
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class Chunk:
    """Rows of a stream: (user_id, item_id) pairs and, when thinning, their weights."""

    pairs: np.ndarray  # [n, 2] int32
    weights: np.ndarray | None  # [n] float64

    def __len__(self) -> int:
        return len(self.pairs)

    def slice(self, lo: int, hi: int) -> Chunk:
        return Chunk(self.pairs[lo:hi], None if self.weights is None else self.weights[lo:hi])

    def take(self, index: np.ndarray) -> Chunk:
        # one 8-byte item per (user, item) pair: a 1-d take is several times faster than
        # fancy-indexing rows of an [n, 2] int32 array
        pairs = np.ascontiguousarray(self.pairs).view(np.int64).reshape(-1)[index].view(np.int32).reshape(-1, 2)
        return Chunk(pairs, None if self.weights is None else self.weights[index])

    @staticmethod
    def concat(parts: Sequence[Chunk], weighted: bool) -> Chunk:
        if not parts:
            return Chunk(np.empty((0, 2), np.int32), np.empty(0) if weighted else None)
        pairs = np.concatenate([p.pairs for p in parts]) if len(parts) > 1 else parts[0].pairs
        weights = None
        if weighted:
            weights = np.concatenate([p.weights for p in parts]) if len(parts) > 1 else parts[0].weights
        return Chunk(pairs, weights)


class GroupLayout:
    """The manifest's ``group_layout``: per group column, each group's files and rows."""

    def __init__(self, root: StoragePath, manifest: dict):
        self.root = root
        layout = manifest.get("group_layout")
        if not isinstance(layout, dict) or "columns" not in layout:
            raise GroupLayoutError(
                f"{self.root / schema.MANIFEST}: no 'group_layout' (the by_group/ partitions the weighted "
                "reader streams); prepare the dataset again with `morec prepare ...`"
            )
        self.seed = int(layout.get("seed", 0))
        self._columns = layout["columns"]

    def columns(self) -> list[str]:
        return list(self._columns)

    def groups(self, column: str) -> list[list[tuple[StoragePath, int]]]:
        """Per group (index g-1): its files as (path, rows), in stream order."""
        if column not in self._columns:
            raise GroupLayoutError(
                f"{self.root / schema.MANIFEST}: group_layout has no column {column!r}; have {self.columns()}"
            )
        entry = self._columns[column]
        num_groups = int(entry["num_groups"])
        out = []
        for g in range(1, num_groups + 1):
            group = entry["groups"].get(str(g))
            if group is None:
                raise GroupLayoutError(f"{self.root / schema.MANIFEST}: group_layout.{column} lacks group {g}")
            out.append([(self.root / f["path"], int(f["rows"])) for f in group["files"]])
        return out

    def counts(self, column: str) -> np.ndarray:
        return np.asarray([sum(r for _, r in files) for files in self.groups(column)], dtype=np.int64)


def share_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s rows [lo, hi) of a group stream of ``rows`` rows (see module doc)."""
    if rows == 0:
        return 0, 0
    if rows < world_size:
        lo = rank % rows
        return lo, lo + 1
    return rows * rank // world_size, rows * (rank + 1) // world_size


def share_segments(files: Sequence[tuple[StoragePath, int]], lo: int, hi: int) -> list[Segment]:
    """The row-group segments covering rows [lo, hi) of the concatenated files."""
    segments: list[Segment] = []
    start = 0
    for f, (path, rows) in enumerate(files):
        if start >= hi:
            break
        if start + rows <= lo:
            start += rows
            continue
        metadata = storage.parquet_file(path).metadata
        if metadata.num_rows != rows:
            raise GroupLayoutError(f"{path}: {metadata.num_rows} rows, the manifest's group_layout says {rows}")
        for rg in range(metadata.num_row_groups):
            n = metadata.row_group(rg).num_rows
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                segments.append(Segment(f, rg, a - start, b - start))
            start += n
    return segments


class GroupStream:
    """One rank's share of one group, served in passes from a cursor (pass, offset)."""

    def __init__(
        self,
        files: Sequence[StoragePath],
        segments: Sequence[Segment],
        *,
        key: tuple[int, ...],
        weight_column: str | None = None,
        window_segments: int = 1,
        in_memory_rows: int = schema.ROW_GROUP_ROWS,
    ):
        self.files = list(files)
        self.segments = list(segments)
        self.key = tuple(int(k) for k in key)  # (seed, rank, objective, group)
        self.weight_column = weight_column
        self.columns = IDS + ([weight_column] if weight_column else [])
        self.rows = sum(s.rows for s in self.segments)
        self.in_memory = self.rows <= in_memory_rows
        self.window_segments = max(1, len(self.segments) if self.in_memory else window_segments)
        self._salt = np.random.SeedSequence(list(self.key)).generate_state(1, np.uint64)[0]
        self.pass_, self.offset = 0, 0
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, int], Chunk] = {}
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # the last plan asked for, with its window ends as a list: (pass, order, ends, ends list);
        # replaced whole (one attribute store), so the prefetch thread reads it without the lock
        self._last_plan: tuple[int, np.ndarray, np.ndarray, list[int]] | None = None
        self._resident: Chunk | None = None  # the whole share, when held in memory
        self._perms: dict[int, np.ndarray] = {}  # row order per pass of a resident share
        self._pass_chunks: dict[int, Chunk] = {}  # a resident share's rows in that order
        self._local = threading.local()  # ParquetFile handles per thread

    # ------------------------------------------------------------ plan of a pass
    def _plan(self, pass_: int) -> tuple[np.ndarray, np.ndarray]:
        """(segment order, window row ends) of pass ``pass_``."""
        entry = self._plan_entry(pass_)
        return entry[1], entry[2]

    def _window_ends(self, pass_: int) -> list[int]:
        """The window row ends of pass ``pass_`` as a list (bisect is cheaper than a numpy call)."""
        return self._plan_entry(pass_)[3]

    def _plan_entry(self, pass_: int) -> tuple[int, np.ndarray, np.ndarray, list[int]]:
        last = self._last_plan
        if last is None or last[0] != pass_:
            order, ends = self._compute_plan(pass_)
            last = self._last_plan = (pass_, order, ends, ends.tolist())
        return last

    def _compute_plan(self, pass_: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            plan = self._plans.get(pass_)
        if plan is not None:
            return plan
        if self.in_memory:  # one window: the whole share
            order, ends = np.arange(len(self.segments)), np.asarray([self.rows], dtype=np.int64)
            return order, ends
        order = self._permutation(STREAM_PASS_ORDER, pass_, 0, len(self.segments))
        sizes = np.asarray([self.segments[i].rows for i in order], dtype=np.int64)
        w = self.window_segments
        ends = np.cumsum([sizes[i : i + w].sum() for i in range(0, len(sizes), w)]).astype(np.int64)
        plan = (order, ends)
        with self._lock:
            self._plans[pass_] = plan
            for old in [p for p in self._plans if p < pass_ - 1]:
                del self._plans[old]
        return plan

    def _permutation(self, tag: int, pass_: int, w: int, n: int) -> np.ndarray:
        """The permutation (tag, pass, window) of range(n): hashed for tiny shares (so many
        passes vectorise, see ``_peek_resident``), else a compiled Fisher-Yates keyed by the
        salt of (stream, tag, pass, window) — cheaper than sorting hashes for large n.
        Which one depends only on n, so a position always maps to the same row."""
        if n <= TINY_SHARE_ROWS:
            return hashed_permutations(self._salts(tag, [pass_], w), n)[0]
        return kernels.permutation(n, self.salt(tag, pass_, w))

    def salt(self, tag: int, pass_: int, w: int = 0) -> np.uint64:
        """``_salts(tag, [pass_], w)[0]`` on Python ints: once per window read or resident
        pass, where the numpy version's per-call overhead was a visible cost."""
        inner = _splitmix64_int(int(self._salt) ^ tag ^ ((w * 0x9E3779B97F4A7C15) & _MASK64))
        return np.uint64(_splitmix64_int((inner + pass_ * 0x9E3779B97F4A7C15) & _MASK64))

    def _salts(self, tag: int, passes, w: int = 0) -> np.ndarray:
        with np.errstate(over="ignore"):
            p = np.asarray(passes, dtype=np.uint64)
            return splitmix64(splitmix64(self._salt ^ np.uint64(tag) ^ (np.uint64(w) * _GOLDEN)) + p * _GOLDEN)

    def _load_resident(self) -> Chunk:
        if self._resident is None:
            self._resident = Chunk.concat([self._read_segment(s) for s in self.segments], bool(self.weight_column))
        return self._resident

    def window_of(self, pass_: int, offset: int) -> tuple[int, int]:
        """(window index, first offset of that window) holding ``offset`` of ``pass_``."""
        ends = self._window_ends(pass_)
        w = bisect.bisect_right(ends, offset)
        return w, ends[w - 1] if w else 0

    def num_windows(self, pass_: int) -> int:
        return len(self._window_ends(pass_))

    # ------------------------------------------------------------ reading
    def _read_columns(self, seg: Segment) -> list[np.ndarray]:
        """The segment's projected columns (user_id, item_id[, weight]) as arrays."""
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        pf = handles.get(seg.file)
        if pf is None:
            pf = handles[seg.file] = open_row_groups(self.files[seg.file])
        table = pf.read_row_group(seg.row_group, columns=self.columns, use_threads=False).slice(seg.lo, seg.rows)
        # one chunk (a row group): its to_numpy is zero-copy, the ChunkedArray's is not
        return [c.chunk(0).to_numpy() if c.num_chunks == 1 else c.to_numpy() for c in table.columns]

    def _read_segment(self, seg: Segment) -> Chunk:
        columns = self._read_columns(seg)
        pairs = np.empty((len(columns[0]), 2), dtype=np.int32)
        pairs[:, 0], pairs[:, 1] = columns[0], columns[1]
        return Chunk(pairs, columns[2].astype(np.float64) if self.weight_column else None)

    def read_window(self, pass_: int, w: int) -> Chunk:
        """Window ``w`` of pass ``pass_``, shuffled: a pure function of (stream, pass, w)."""
        if self.in_memory:
            return self._load_resident().take(self._pass_permutation(pass_))
        order, _ = self._plan(pass_)
        picked = order[w * self.window_segments : (w + 1) * self.window_segments]
        parts = [self._read_columns(self.segments[i]) for i in picked]
        columns = [np.concatenate(c) if len(c) > 1 else c[0] for c in zip(*parts, strict=True)]
        # Every pass, pass 0 included, shuffles: so the order depends on the training seed,
        # not only on the layout's. Interleaving and permuting are one compiled pass.
        salt = self.salt(STREAM_PASS_ROWS, pass_, w)
        pairs = kernels.shuffle_rows(columns[0], columns[1], salt).view(np.int32).reshape(-1, 2)
        weights = None
        if self.weight_column:  # the same order: shuffle_rows applies permutation(n, salt)
            weights = columns[2].astype(np.float64)[kernels.permutation(len(pairs), salt)]
        return Chunk(pairs, weights)

    def cached(self, pass_: int, w: int) -> bool:
        with self._lock:
            return (pass_, w) in self._cache

    def put(self, pass_: int, w: int, chunk: Chunk) -> None:
        with self._lock:
            if (pass_, w) >= self._current_window_key():
                self._cache[(pass_, w)] = chunk

    def _current_window_key(self) -> tuple[int, int]:
        # called under the lock; the plan of the cursor's pass is always computed by then
        last = self._last_plan
        if last is not None and last[0] == self.pass_:
            return (self.pass_, bisect.bisect_right(last[3], self.offset))
        order_ends = self._plans.get(self.pass_)
        if order_ends is None:
            return (self.pass_, 0)
        w = int(np.searchsorted(order_ends[1], self.offset, side="right"))
        return (self.pass_, w)

    def _window(self, pass_: int, w: int) -> Chunk:
        with self._lock:
            chunk = self._cache.get((pass_, w))
        if chunk is None:
            chunk = self.read_window(pass_, w)
            with self._lock:
                self._cache[(pass_, w)] = chunk
        return chunk

    # ------------------------------------------------------------ serving rows
    def peek(self, n: int) -> Chunk:
        """The next ``n`` rows from the cursor (wrapping over passes), without moving it."""
        if n > 0 and self.rows == 0:
            raise ValueError(f"group stream {self.key}: asked for {n} rows of an empty share")
        if self.in_memory:
            return self._peek_resident(n)
        parts: list[Chunk] = []
        pass_, offset = self.pass_, self.offset
        while n > 0:
            w, first = self.window_of(pass_, offset)
            chunk = self._window(pass_, w)
            lo = offset - first
            take = min(n, len(chunk) - lo)
            parts.append(chunk.slice(lo, lo + take))
            n -= take
            offset += take
            if offset == self.rows:
                pass_, offset = pass_ + 1, 0
        return Chunk.concat(parts, bool(self.weight_column))

    def _pass_permutation(self, pass_: int) -> np.ndarray:
        """The row order of pass ``pass_`` of a resident share (the current and next are cached)."""
        with self._lock:
            perm = self._perms.get(pass_)
        if perm is None:
            perm = self._permutation(STREAM_PASS_ROWS, pass_, 0, self.rows)
            with self._lock:
                self._perms[pass_] = perm
        return perm

    def _pass_rows(self, pass_: int) -> Chunk:
        """The resident share in the row order of pass ``pass_``, gathered once per pass so
        that serving rows from it is slicing."""
        with self._lock:
            chunk = self._pass_chunks.get(pass_)
        if chunk is None:
            resident = self._load_resident()
            if self.rows > TINY_SHARE_ROWS and resident.weights is None:
                # permute and gather in one compiled pass: the rows of permutation(n, salt)
                salt = self.salt(STREAM_PASS_ROWS, pass_)
                rows = kernels.shuffle_pairs(np.ascontiguousarray(resident.pairs).view(np.int64).reshape(-1), salt)
                chunk = Chunk(rows.view(np.int32).reshape(-1, 2), None)
            else:
                chunk = resident.take(self._pass_permutation(pass_))
            with self._lock:
                self._pass_chunks[pass_] = chunk
        return chunk

    def _peek_resident(self, n: int) -> Chunk:
        resident = self._load_resident()
        last = (self.offset + n - 1) // self.rows if n else 0
        if last <= 1 or self.rows > TINY_SHARE_ROWS:  # pass by pass, slices of cached pass orders
            parts: list[Chunk] = []
            pass_, offset = self.pass_, self.offset
            while n > 0:
                take = min(n, self.rows - offset)
                parts.append(self._pass_rows(pass_).slice(offset, offset + take))
                n -= take
                pass_, offset = pass_ + 1, 0
            return Chunk.concat(parts, bool(self.weight_column))
        # a tiny share, many passes in one request: all permuted in one vectorised call
        position = self.offset + np.arange(n, dtype=np.int64)
        passes = position // self.rows
        perms = hashed_permutations(self._salts(STREAM_PASS_ROWS, self.pass_ + np.arange(last + 1)), self.rows)
        return resident.take(perms[passes, position % self.rows])

    def prefetch(self, depth: int) -> bool:
        """Reads what the next ``depth`` windows need; True if it read anything."""
        if self.rows == 0:
            return False
        if self.in_memory:
            if self._resident is not None:
                return False
            self._load_resident()
            return True
        busy = False
        for pass_, w in self.upcoming(depth):
            if not self.cached(pass_, w):
                self.put(pass_, w, self.read_window(pass_, w))
                busy = True
        return busy

    def advance(self, n: int) -> None:
        """Moves the cursor ``n`` rows on and drops the windows behind it."""
        if self.rows == 0:
            return
        total = self.offset + n
        pass_, offset = self.pass_ + total // self.rows, total % self.rows
        self._plan(pass_)
        with self._lock:
            self.pass_, self.offset = pass_, offset
            current = self._current_window_key()
            for key in [k for k in self._cache if k < current]:
                del self._cache[key]
            for cache in (self._perms, self._pass_chunks):
                for old in [q for q in cache if q < pass_]:
                    del cache[old]

    def take(self, n: int) -> Chunk:
        chunk = self.peek(n)
        self.advance(n)
        return chunk

    # ------------------------------------------------------------ state
    def cursor(self) -> tuple[int, int]:
        with self._lock:
            return self.pass_, self.offset

    def seek(self, pass_: int, offset: int) -> None:
        if not (pass_ >= 0 and 0 <= offset < max(1, self.rows)):
            raise ValueError(f"group stream {self.key}: cursor ({pass_}, {offset}) outside a share of {self.rows} rows")
        self._plan(pass_)
        with self._lock:
            self.pass_, self.offset = int(pass_), int(offset)
            self._cache.clear()
            self._perms.clear()
            self._pass_chunks.clear()

    def upcoming(self, depth: int) -> list[tuple[int, int]]:
        """The cursor's window and the ``depth`` windows after it, as (pass, w)."""
        if self.rows == 0:
            return []
        pass_, offset = self.cursor()
        w, _ = self.window_of(pass_, offset)
        out = []
        for _ in range(depth + 1):
            out.append((pass_, w))
            w += 1
            if w >= self.num_windows(pass_):
                pass_, w = pass_ + 1, 0
        return out


class WindowPrefetcher(threading.Thread):
    """Keeps each stream's next ``depth`` windows read ahead of its cursor (data, not batches)."""

    def __init__(self, streams: Sequence[GroupStream], depth: int, name: str = "group-prefetch"):
        super().__init__(name=name, daemon=True)
        self.streams, self.depth = list(streams), depth
        self._halt = threading.Event()
        self.wake = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            busy = False
            for stream in self.streams:
                if self._halt.is_set():
                    return
                try:
                    busy |= stream.prefetch(self.depth)
                except Exception:  # broad on purpose: the consumer reads it itself and raises
                    return
            if not busy:
                self.wake.wait(0.05)
                self.wake.clear()

    def stop(self) -> None:
        self._halt.set()
        self.wake.set()
        self.join(timeout=10)
