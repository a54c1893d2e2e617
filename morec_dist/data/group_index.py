"""The group-stratified index that makes exact group-first sampling cheap, at any data size.

Weighted (MoRec) sampling draws a group g with probability p[g], then a train row whose
group column equals g, uniformly. Doing that exactly over Parquet needs random access to
"the j-th row of group g". The index provides it:

- ``rows.npy``: every train row's ``(user_id, item_id)`` as an int32 pair, stably sorted by
  the group column, so that group g is the contiguous stratum ``[starts[g-1], starts[g])``.
  8 bytes a row, on disk, never loaded: it is memory-mapped and read by position.
- ``index.json``: the group column, the number of groups, the stratum offsets (O(groups)),
  the format version and the fingerprint of the train files it was built from.

It is built once per (group column, train content) by two streaming passes over the train
files (count per group, then scatter each row group's rows into their strata with
``pwrite``), in a temporary directory that is renamed into place, so concurrent builders
(several ranks) and crashes never expose a half-written index. Memory while building is
one row group plus O(groups).

``GroupSampler`` draws from it: a group g ~ p, then a uniform offset in g's stratum.

Reading keeps the resident set bounded too: an index file larger than the resident budget
is read in sorted position order one region at a time, and each region's pages are
released (``MADV_DONTNEED``; they stay in the OS page cache) before the next, so the
process's RSS does not grow with the dataset. See docs/data-layer.md.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from morec_dist.data.dataset import PreparedDataset

INDEX_FORMAT = 1
INDEX_DIR = ".index"
ROWS_FILE = "rows.npy"
META_FILE = "index.json"
ROW_DTYPE = np.dtype("<i4")  # (user_id, item_id) pairs, shape [rows, 2]
ROW_BYTES = 2 * ROW_DTYPE.itemsize
PAIR_DTYPE = np.dtype("<i8")  # the same bytes, one item per row
DEFAULT_RESIDENT_BUDGET_MB = 256  # per reader, shared by its indexes


class GroupIndexError(ValueError):
    """A group column cannot be indexed (missing, mistyped, out of range) or an index is stale."""


def index_key(dataset: PreparedDataset, group_column: str, split: str = "train") -> str:
    """The cache key: format version, group column and the split's file checksums."""
    text = f"{INDEX_FORMAT}|{split}|{group_column}|{dataset.files_fingerprint(split)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _num_groups_hint(dataset: PreparedDataset, group_column: str) -> int | None:
    stats = dataset.manifest.get("groups", {}).get(group_column)
    return int(stats["num_groups"]) if stats is not None else None


def _count_groups(files: list[Path], group_column: str) -> np.ndarray:
    """Pass 1: rows per group value (index = value). Validates type and range on the way."""
    counts = np.zeros(1, dtype=np.int64)
    for path in files:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if group_column not in names:
            raise GroupIndexError(f"{path}: group column {group_column!r} missing (have {names})")
        field_type = pf.schema_arrow.field(group_column).type
        if str(field_type) not in ("int16", "int32", "int8"):
            raise GroupIndexError(f"{path}: group column {group_column!r} has type {field_type}, expected int16")
        for rg in range(pf.num_row_groups):
            values = pf.read_row_group(rg, columns=[group_column], use_threads=False).column(0).to_numpy()
            if values.size == 0:
                continue
            low = int(values.min())
            if low < 1:
                raise GroupIndexError(f"{path}: group column {group_column!r} holds {low}; group ids are 1-based (>= 1)")
            here = np.bincount(values.astype(np.int64))
            if here.size > counts.size:
                counts = np.concatenate([counts, np.zeros(here.size - counts.size, np.int64)])
            counts[: here.size] += here
    return counts


def _write_npy_header(f, rows: int) -> int:
    np.lib.format.write_array_header_1_0(f, {"descr": ROW_DTYPE.str, "fortran_order": False, "shape": (rows, 2)})
    return f.tell()


def _scatter_rows(files: list[Path], group_column: str, starts: np.ndarray, fd: int, data_offset: int) -> None:
    """Pass 2: each row group's rows, stably sorted by group, written into their strata."""
    filled = starts[:-1].copy()  # next free position per group (index g-1)
    for path in files:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=["user_id", "item_id", group_column], use_threads=False)
            groups = table.column(2).to_numpy().astype(np.int64)
            order = np.argsort(groups, kind="stable")
            pairs = np.empty((len(order), 2), dtype=ROW_DTYPE)
            pairs[:, 0] = table.column(0).to_numpy()[order]
            pairs[:, 1] = table.column(1).to_numpy()[order]
            present, first, count = np.unique(groups[order], return_index=True, return_counts=True)
            for g, lo, n in zip(present.tolist(), first.tolist(), count.tolist()):
                os.pwrite(fd, pairs[lo : lo + n].tobytes(), data_offset + int(filled[g - 1]) * ROW_BYTES)
                filled[g - 1] += n
    if not np.array_equal(filled, starts[1:]):
        raise GroupIndexError(f"group column {group_column!r}: the train files changed while the index was built")


def build_group_index(dataset: PreparedDataset, group_column: str, out_dir: Path) -> None:
    """Writes ``rows.npy`` and ``index.json`` for ``group_column`` into ``out_dir`` (must be new)."""
    files = dataset.split_files("train")
    counts = _count_groups(files, group_column)
    observed = counts.size - 1
    hint = _num_groups_hint(dataset, group_column)
    if hint is not None and observed > hint:
        raise GroupIndexError(
            f"group column {group_column!r}: train rows hold group {observed}, but the manifest says num_groups={hint}"
        )
    num_groups = hint if hint is not None else observed
    per_group = np.zeros(num_groups, dtype=np.int64)
    per_group[:observed] = counts[1:]
    starts = np.concatenate([[0], np.cumsum(per_group)])
    rows = int(starts[-1])
    with open(out_dir / ROWS_FILE, "wb") as f:
        data_offset = _write_npy_header(f, rows)
        f.truncate(data_offset + rows * ROW_BYTES)
        f.flush()
        _scatter_rows(files, group_column, starts, f.fileno(), data_offset)
        os.fsync(f.fileno())
    meta = {
        "format": INDEX_FORMAT,
        "group_column": group_column,
        "num_groups": num_groups,
        "rows": rows,
        "starts": [int(s) for s in starts],
        "train_fingerprint": dataset.files_fingerprint("train"),
    }
    with open(out_dir / META_FILE, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def ensure_group_index(dataset: PreparedDataset, group_column: str, cache_dir: str | Path | None = None) -> Path:
    """The index directory for ``group_column``, building and publishing it atomically if absent.

    ``cache_dir`` defaults to ``<dataset>/.index``. Several processes may call this at once:
    each builds into its own temporary directory and the first rename wins.
    """
    root = Path(cache_dir) if cache_dir is not None else dataset.path / INDEX_DIR
    target = root / f"{group_column}-{index_key(dataset, group_column)}"
    if (target / META_FILE).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        build_group_index(dataset, group_column, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / META_FILE).exists():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class GroupStrata:
    """Where each group's rows lie in the index: group g (1-based) is [starts[g-1], starts[g])."""

    group_column: str
    starts: np.ndarray  # [G + 1] int64

    @property
    def num_groups(self) -> int:
        return len(self.starts) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.starts)

    @property
    def rows(self) -> int:
        return int(self.starts[-1])


class GroupIndex:
    """A read-only, memory-mapped group-stratified index with a bounded resident set."""

    def __init__(self, path: str | Path, resident_budget_mb: float = DEFAULT_RESIDENT_BUDGET_MB):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise GroupIndexError(f"{meta_path}: missing (build it with ensure_group_index)") from None
        if meta.get("format") != INDEX_FORMAT:
            raise GroupIndexError(f"{meta_path}: format {meta.get('format')} != supported {INDEX_FORMAT}")
        self.strata = GroupStrata(meta["group_column"], np.asarray(meta["starts"], dtype=np.int64))
        self.train_fingerprint: str = meta["train_fingerprint"]
        rows_path = self.path / ROWS_FILE
        self._file = open(rows_path, "rb")
        self._data_offset = self._read_header_offset(rows_path)
        expected = self._data_offset + self.strata.rows * ROW_BYTES
        if os.fstat(self._file.fileno()).st_size != expected:
            raise GroupIndexError(f"{rows_path}: {os.fstat(self._file.fileno()).st_size} bytes, expected {expected}")
        self._map: mmap.mmap | None = None
        # Rows are read as one int64 per (user_id, item_id) pair: a 1-d take of 8-byte items is
        # several times faster than fancy-indexing rows of a [N, 2] int32 array.
        self._rows: np.ndarray = np.empty(0, dtype=PAIR_DTYPE)
        if self.strata.rows:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._rows = np.frombuffer(self._map, dtype=PAIR_DTYPE, offset=self._data_offset)
        self._budget_bytes = max(4 * mmap.PAGESIZE, int(resident_budget_mb * (1 << 20)))
        # A small index stays mapped (and resident); a large one is read region by region.
        self._bounded = self.strata.rows * ROW_BYTES > self._budget_bytes

    def _read_header_offset(self, rows_path: Path) -> int:
        version = np.lib.format.read_magic(self._file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(self._file)
        if dtype != ROW_DTYPE or fortran or len(shape) != 2 or shape[1] != 2 or shape[0] != self.strata.rows:
            raise GroupIndexError(f"{rows_path}: header {shape} {dtype} does not match index.json ({self.strata.rows} rows)")
        return self._file.tell()

    @property
    def num_groups(self) -> int:
        return self.strata.num_groups

    @property
    def counts(self) -> np.ndarray:
        return self.strata.counts

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The (user_id, item_id) pairs at ``positions`` (int64), in the order given: [n, 2] int32."""
        if not self._bounded:
            return self._rows[positions].view(ROW_DTYPE).reshape(-1, 2)
        return self._gather_bounded(positions)

    def _gather_bounded(self, positions: np.ndarray) -> np.ndarray:
        # Visit positions in file order, one region of at most half the budget at a time, and
        # release each region's pages before the next, so RSS stays under the budget.
        order = np.argsort(positions, kind="stable")
        sorted_pos = positions[order]
        out = np.empty(len(positions), dtype=PAIR_DTYPE)
        region_rows = max(1, (self._budget_bytes // 2) // ROW_BYTES)
        regions, firsts = np.unique(sorted_pos // region_rows, return_index=True)  # only regions hit
        ends = np.append(firsts[1:], len(sorted_pos))
        for region, lo, hi in zip(regions.tolist(), firsts.tolist(), ends.tolist()):
            out[order[lo:hi]] = self._rows[sorted_pos[lo:hi]]
            self._release(region * region_rows, (region + 1) * region_rows)
        return out.view(ROW_DTYPE).reshape(-1, 2)

    def _release(self, first_row: int, end_row: int) -> None:
        assert self._map is not None
        page = mmap.PAGESIZE
        start = (self._data_offset + first_row * ROW_BYTES) // page * page
        end = min(len(self._map), self._data_offset + end_row * ROW_BYTES + page)
        self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        self._rows = np.empty(0, dtype=PAIR_DTYPE)
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()


class GroupSampler:
    """Exact group-first draws for one group column: g ~ p, then a uniform row of group g."""

    def __init__(self, index: GroupIndex):
        self.index = index
        self.counts = index.counts
        self.starts = index.strata.starts[:-1]

    @property
    def num_groups(self) -> int:
        return len(self.counts)

    def draw_positions(self, rng: np.random.Generator, p: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(group ids 1..G, index positions) of n i.i.d. draws; p must be validated."""
        cdf = np.cumsum(p)
        # u * total < total = cdf[-1], and a zero-mass group has cdf equal to its predecessor's,
        # so searchsorted(side="right") can never return it.
        groups = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
        # u * total can round up to total (probability ~2**-53): that draw belongs to the last
        # group with mass, which is where the rounding came from.
        np.minimum(groups, np.flatnonzero(p)[-1], out=groups)
        offsets = rng.integers(0, self.counts[groups])
        return groups + 1, self.starts[groups] + offsets

    def draw(self, rng: np.random.Generator, p: np.ndarray, n: int) -> np.ndarray:
        """n i.i.d. (user_id, item_id) pairs, [n, 2] int32."""
        _, positions = self.draw_positions(rng, p, n)
        return self.index.gather(positions)


def open_group_index(
    dataset: PreparedDataset,
    group_column: str,
    *,
    cache_dir: str | Path | None = None,
    resident_budget_mb: float = DEFAULT_RESIDENT_BUDGET_MB,
) -> GroupIndex:
    """Builds the index if needed and opens it; refuses one built from other train files."""
    path = ensure_group_index(dataset, group_column, cache_dir)
    index = GroupIndex(path, resident_budget_mb)
    if index.train_fingerprint != dataset.files_fingerprint("train"):
        index.close()
        raise GroupIndexError(f"{path}: built from other train files (fingerprint mismatch); delete it to rebuild")
    return index
