"""The per-rank streaming reader: uniform epochs, per-group weighted streams, MoRec batches.

Owns how train rows reach a rank:

- **Uniform stream** (pretraining, and block 0 of a MoRec batch): every epoch the train row
  groups are permuted from (seed, epoch) — the same permutation on every rank — and the
  concatenated row stream is cut into one contiguous range per rank, sized so that every
  rank yields exactly the same number of batches while every row is read exactly once per
  epoch across all ranks (see ``batch_sizes``). A rank reads its range a window of row
  groups at a time (projected to user_id, item_id) and shuffles each window.
- **Weighted blocks** (one per auxiliary objective k): each row's group i.i.d. from p_k
  (so the counts are c ~ Multinomial(B, p_k)), from uniforms that are a pure function of
  (seed, rank, epoch, step, k), then the next c_g rows of each group's stream; the groups
  of up to ``draw_steps`` steps (ending where the next change of p is due) are drawn and
  gathered at once, with the same result as one step at a time (``WeightedObjective``).
  A group's stream (``group_streams``) is the rank's share of the group-partitioned
  layout ``by_group/``, read sequentially, each row once
  per pass of the group. The group choice is exact; within a group, rows are drawn without replacement.
  An objective with a row weight column (revenue's ``price_weighting = "exact"``) thins
  its stream: a row is kept with probability w / max_g(w), so within a group the rows kept
  are distributed as w.
- **Probabilities** are versioned snapshots swapped atomically by ``set_probabilities``.
  Weighted blocks are assembled when the consumer asks for step t, with the newest
  snapshot set before that request, so a change of p is never late and a batch never mixes
  versions. Only data is prefetched: the uniform blocks (which do not depend on p) and each
  group stream's next windows of rows (``WindowPrefetcher``); a batch never depends on how
  far the prefetch got.
- **Determinism and resume**: every random choice of step t is seeded from
  (seed, rank, epoch, step, stream); the weighted blocks also depend on the group streams'
  cursors, so ``state_dict`` is the position, the snapshot and a cursor (pass, offset) per
  (objective, group): resuming is bit-exact, across a change of p too.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from morec_dist.data import kernels, storage
from morec_dist.data.batch import UNIFORM_VERSION, Batch
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.data.group_streams import (
    GroupLayout,
    GroupStream,
    WindowPrefetcher,
    open_row_groups,
    share_bounds,
    share_segments,
)
from morec_dist.data.negatives import HISTORY_SPLITS, NegativeSampler
from morec_dist.data.storage import Location, StoragePath

STATE_FORMAT = 2
PROJECTED_COLUMNS = ["user_id", "item_id"]
# Stream ids: each random choice draws from its own seed sequence, so changing one (e.g. a
# new probabilities version redraws weighted blocks) never shifts another.
STREAM_EPOCH_ORDER = 0
STREAM_WINDOW_SHUFFLE = 1
STREAM_WEIGHTED = 2
STREAM_NEGATIVES = 3
STREAM_THINNING = 4


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


# ------------------------------------------------------------------ uniform epochs


def batch_sizes(total_rows: int, batch_size: int, world_size: int, rank: int) -> np.ndarray:
    """Batch sizes of ``rank`` in one epoch; the same count on every rank, rows seen once.

    All batches hold ``batch_size`` rows except the last step's, where the remainder
    R = total - (steps - 1) * world * B is split as evenly as possible (ranks < R % world
    get one row more). When R < world some rank would get an empty last batch, so the
    remainder is folded into the previous step instead (one extra row on ranks < R).
    """
    if total_rows < world_size:
        raise ValueError(f"uniform stream: {total_rows} train rows cannot be split over {world_size} ranks")
    steps = math.ceil(total_rows / (world_size * batch_size))
    remainder = total_rows - (steps - 1) * world_size * batch_size
    if remainder >= world_size:
        sizes = np.full(steps, batch_size, dtype=np.int64)
        sizes[-1] = remainder // world_size + (1 if rank < remainder % world_size else 0)
    else:
        sizes = np.full(steps - 1, batch_size, dtype=np.int64)
        sizes[-1] += 1 if rank < remainder else 0
    return sizes


@dataclass(frozen=True)
class _Segment:
    file: int
    row_group: int
    lo: int
    hi: int


class UniformStream:
    """One rank's shuffled pass over the train rows, epoch by epoch, startable at any step."""

    def __init__(
        self,
        files: Sequence[StoragePath],
        *,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        window_row_groups: int = 4,
    ):
        self.files = list(files)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.window_row_groups = max(1, window_row_groups)
        catalogue = []
        for f, path in enumerate(self.files):
            metadata = storage.parquet_file(path).metadata
            for g in range(metadata.num_row_groups):
                rows = metadata.row_group(g).num_rows
                if rows:
                    catalogue.append((f, g, rows))
        self._row_groups = np.asarray(catalogue, dtype=np.int64).reshape(-1, 3)
        self.total_rows = int(self._row_groups[:, 2].sum())
        self.sizes = batch_sizes(self.total_rows, batch_size, world_size, rank)
        self._bounds = np.concatenate([[0], np.cumsum(self.sizes)])
        totals = [int(batch_sizes(self.total_rows, batch_size, world_size, r).sum()) for r in range(world_size)]
        self.rank_offset = sum(totals[:rank])
        self.rank_rows = totals[rank]
        self._handles: dict[int, pq.ParquetFile] = {}

    @property
    def num_batches(self) -> int:
        return len(self.sizes)

    def _windows(self, epoch: int) -> list[list[_Segment]]:
        order = _rng(self.seed, STREAM_EPOCH_ORDER, epoch).permutation(len(self._row_groups))
        groups = self._row_groups[order]
        ends = np.cumsum(groups[:, 2])
        starts = ends - groups[:, 2]
        lo, hi = self.rank_offset, self.rank_offset + self.rank_rows
        segments = []
        for i in np.flatnonzero((ends > lo) & (starts < hi)).tolist():
            f, g, _ = groups[i].tolist()
            segments.append(
                _Segment(f, g, max(lo, int(starts[i])) - int(starts[i]), min(hi, int(ends[i])) - int(starts[i]))
            )
        w = self.window_row_groups
        return [segments[i : i + w] for i in range(0, len(segments), w)]

    def _read_segment(self, seg: _Segment) -> np.ndarray:
        pf = self._handles.get(seg.file)
        if pf is None:
            pf = self._handles[seg.file] = open_row_groups(self.files[seg.file])
        table = pf.read_row_group(seg.row_group, columns=PROJECTED_COLUMNS, use_threads=False).slice(
            seg.lo, seg.hi - seg.lo
        )
        pairs = np.empty((table.num_rows, 2), dtype=np.int32)
        pairs[:, 0] = table.column(0).to_numpy()
        pairs[:, 1] = table.column(1).to_numpy()
        return pairs

    def _read_window(self, epoch: int, w: int, segments: list[_Segment]) -> np.ndarray:
        pairs = np.concatenate([self._read_segment(s) for s in segments])
        return pairs[_rng(self.seed, STREAM_WINDOW_SHUFFLE, epoch, self.rank, w).permutation(len(pairs))]

    def iter_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (step, [n, 2] int32 (user_id, item_id)) from ``start_step`` to the epoch's end."""
        windows = self._windows(epoch)
        window_ends = np.cumsum([sum(s.hi - s.lo for s in win) for win in windows])
        if start_step >= self.num_batches:
            return
        first_row = int(self._bounds[start_step])
        w = int(np.searchsorted(window_ends, first_row, side="right"))
        buffer = np.empty((0, 2), dtype=np.int32)
        buffer_start = int(window_ends[w - 1]) if w > 0 else 0
        for step in range(start_step, self.num_batches):
            lo, hi = int(self._bounds[step]), int(self._bounds[step + 1])
            while buffer_start + len(buffer) < hi:
                buffer = np.concatenate([buffer, self._read_window(epoch, w, windows[w])])
                w += 1
            yield step, buffer[lo - buffer_start : hi - buffer_start]
            buffer, buffer_start = buffer[hi - buffer_start :], hi  # drop the rows served


# ------------------------------------------------------------------ weighted blocks


@dataclass(frozen=True)
class ProbabilitySnapshot:
    version: int
    probabilities: tuple[np.ndarray, ...]  # one normalised p per objective, objective order


def validate_probabilities(name: str, group_column: str, p: Any, counts: np.ndarray) -> np.ndarray:
    """A clean, normalised copy of ``p`` for an objective, or a ValueError naming the problem."""
    where = f"objective {name!r} (group column {group_column!r})"
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: probabilities must be numbers, got {p!r}") from None
    if arr.ndim != 1 or arr.shape[0] != len(counts):
        raise ValueError(f"{where}: expected {len(counts)} probabilities (one per group), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(
            f"{where}: probabilities must be finite; NaN/inf at groups "
            f"{(np.flatnonzero(~np.isfinite(arr)) + 1).tolist()}"
        )
    if (arr < 0).any():
        raise ValueError(
            f"{where}: probabilities must be >= 0; negative at groups {(np.flatnonzero(arr < 0) + 1).tolist()}"
        )
    total = arr.sum()
    if total <= 0:
        raise ValueError(f"{where}: probabilities are all zero")
    empty = np.flatnonzero((arr > 0) & (counts == 0))
    if empty.size:
        raise ValueError(f"{where}: positive probability on groups {(empty + 1).tolist()}, which have no train rows")
    out = arr / total
    out.flags.writeable = False
    return out


MAX_THINNING_ROUNDS = 10_000
DRAW_STEPS = 64  # steps of group choices drawn and gathered at once (amortises the numpy calls)
LOOKUP_BITS = 14  # the group choice looks up the top bits of each 64-bit uniform in a table


_EDGES = np.arange((1 << LOOKUP_BITS) + 1, dtype=np.float64) / (1 << LOOKUP_BITS)
# bucket b holds the uniforms in [lower[b], upper[b]]
_BUCKET_EDGES = (_EDGES[:-1], np.nextafter(_EDGES[1:], 0.0))
_SHIFT = np.uint64(64 - LOOKUP_BITS)


@dataclass(frozen=True)
class _GroupTable:
    """Inverse-CDF lookup of one p: bucket b (the top LOOKUP_BITS bits of a uniform) maps to
    its group when no CDF boundary falls inside the bucket, else -1 (then a binary search)."""

    p: np.ndarray
    cdf: np.ndarray
    table: np.ndarray  # [2**LOOKUP_BITS] int16
    last: int  # the last group with p > 0 (rounding of the cdf never picks past it)

    @staticmethod
    def build(p: np.ndarray) -> _GroupTable:
        cdf = np.cumsum(p)
        last = int(np.flatnonzero(p > 0)[-1])
        return _GroupTable(p, cdf, kernels.lookup_table(cdf, last, *_BUCKET_EDGES), last)

    def groups(self, raw: np.ndarray) -> np.ndarray:
        """The group (0-based, int16) of each raw 64-bit uniform: searchsorted(cdf, u, "right")
        for u = (raw >> 11) * 2**-53, the double numpy's ``random()`` makes of it."""
        return kernels.group_labels(np.asarray(raw, np.uint64), self.table, self.cdf, self.last, _SHIFT)

    def draw(self, seed: np.uint64, first: int, steps: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(groups, cum) of ``kernels.draw_groups``: the groups of ``steps`` steps of ``size``
        rows from step ``first`` and the per-group counts at each step boundary, one pass."""
        return kernels.draw_groups(seed, first, steps, size, self.table, self.cdf, self.last, len(self.p), _SHIFT)


@dataclass
class _Draws:
    """The blocks of steps [first, first + steps) at one p, gathered at once. The group
    streams' cursors stay at ``first`` until the draws are settled; ``cum[i]`` are the rows
    steps first..first+i-1 take from each group."""

    epoch: int
    first: int
    size: int
    p: np.ndarray
    rows: np.ndarray  # [steps * size] int64: each (user_id, item_id) int32 pair as one item
    cum: np.ndarray  # [steps + 1, groups] int64
    used: int = 0
    steps: int = field(init=False)
    blocks: np.ndarray = field(init=False)  # [steps, size, 2] int32: step i's block

    def __post_init__(self) -> None:
        self.steps = len(self.cum) - 1
        self.blocks = self.rows.view(np.int32).reshape(self.steps, self.size, 2)

    def serves(self, epoch: int, step: int, p: np.ndarray, size: int) -> bool:
        return (
            self.used < self.steps
            and step == self.first + self.used
            and epoch == self.epoch
            and size == self.size
            and (p is self.p or np.array_equal(p, self.p))
        )


STAGE_ROWS = 8192  # rows a refill stages at least, per group


class _Staging:
    """The next rows of every group stream of one objective, in one int64 array, so that one
    compiled scatter serves a run from all groups without a peek or a copy per group per run.

    Group g's rows are ``buf[base[g] : base[g] + fill[g]]``: the rows of its stream from the
    stream's cursor on (the cursor is moved only by a refill), of which the first ``pos[g]``
    were served by settled runs. A group is refilled when a run needs more than
    ``fill - pos``, with max(that need, STAGE_ROWS) rows, so after a run a group holds at
    most STAGE_ROWS unserved rows; memory is about G x STAGE_ROWS x 8 bytes plus a run."""

    def __init__(self, streams: Sequence[GroupStream]):
        self.streams = streams
        groups = len(streams)
        self.cap = np.zeros(groups, np.int64)
        self.base = np.zeros(groups, np.int64)
        self.fill = np.zeros(groups, np.int64)
        self.pos = np.zeros(groups, np.int64)
        self.buf = np.empty(0, np.int64)

    def reset(self) -> None:
        """Forgets the staged rows (the streams' cursors are where the next rows start)."""
        self.fill[:] = 0
        self.pos[:] = 0

    def settle(self, served: np.ndarray) -> None:
        """Marks ``served[g]`` more rows of each group as served, and forgets staged rows
        beyond STAGE_ROWS unserved ones (those of a run cut short by a new p): they are the
        streams' next rows, staged again when needed, so the buffer never holds more."""
        self.pos += served
        np.minimum(self.fill, self.pos + STAGE_ROWS, out=self.fill)

    def starts(self, need: np.ndarray) -> np.ndarray:
        """Where each group's next unserved row is in ``buf``, after staging ``need[g]`` rows
        ahead of it for every group."""
        short = np.flatnonzero(self.pos + need > self.fill)
        if short.size:
            self._refill(short.tolist(), need)
        return self.base + self.pos

    def _refill(self, groups: list[int], need: np.ndarray) -> None:
        want = {g: max(int(need[g]), STAGE_ROWS) for g in groups}
        if any(want[g] > self.cap[g] for g in groups):
            self._grow(want, int(need.sum()))
        for g in groups:
            stream = self.streams[g]
            if self.pos[g]:
                stream.advance(int(self.pos[g]))
            rows = stream.peek(want[g]).pairs
            lo = int(self.base[g])
            self.buf[lo : lo + want[g]] = np.ascontiguousarray(rows).view(np.int64).reshape(-1)
            self.fill[g], self.pos[g] = want[g], 0

    def _grow(self, want: dict[int, int], run_rows: int) -> None:
        """A new buffer where the groups in ``want`` get a region of that many rows. The
        other regions keep their size unless the buffer would exceed G x STAGE_ROWS plus
        four runs; then each is cut to its unserved rows (at most STAGE_ROWS after a
        ``settle``), so groups that needed many rows under an earlier p do not keep large
        regions."""
        live = self.fill - self.pos
        cap = np.maximum(self.cap, STAGE_ROWS)  # every group gets a region: fewer regrowths
        for g, n in want.items():
            cap[g] = _pow2(max(n, int(live[g])))
        if cap.sum() > len(cap) * STAGE_ROWS + 4 * run_rows:
            shrunk = np.asarray([_pow2(max(STAGE_ROWS, int(n))) for n in live], np.int64)
            cap = np.where(np.isin(np.arange(len(cap)), list(want)), cap, shrunk)
        base = np.cumsum(cap) - cap
        buf = np.empty(int(cap.sum()), np.int64)
        for g in np.flatnonzero(self.fill).tolist():  # keep the unserved staged rows
            rows, served = int(live[g]), int(self.pos[g])
            old = int(self.base[g]) + served
            buf[base[g] : base[g] + rows] = self.buf[old : old + rows]
            if served:  # the served rows are dropped: the stream's cursor moves past them
                self.streams[g].advance(served)
            self.fill[g], self.pos[g] = rows, 0
        self.buf, self.base, self.cap = buf, base, cap


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class WeightedObjective:
    """Objective k's weighted blocks: a group per row drawn from p, rows from the streams.

    Row i of step t's block is from group G_ti, where the G_ti are i.i.d. categorical(p_k)
    (so the counts are Multinomial(B, p_k) and the groups are in a uniformly random order
    within the block), computed from the 64-bit uniforms of a counter-based generator
    (SplitMix64 of (seed, rank, k, epoch), outputs [t B, (t + 1) B)): a pure function of
    (seed, rank, epoch, step, k) and p. The j-th row of group g in step t is the next row of
    g's stream. So a run of ``draw_steps`` steps is drawn and gathered at once (two compiled
    loops, ``kernels.draw_groups`` and ``kernels.scatter_by_group``, from the staged next
    rows of every group, ``_Staging``), and the blocks are the same whatever ``draw_steps`` is; a new p,
    epoch or an out-of-order step drops the rest of a run and draws again from that step.
    """

    def __init__(
        self,
        dataset: PreparedDataset,
        layout: GroupLayout,
        name: str,
        column: str,
        k: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        weight_column: str | None = None,
        window_segments: int = 1,
        in_memory_rows: int | None = None,
        draw_steps: int = DRAW_STEPS,
    ):
        if draw_steps < 1:
            raise ValueError(f"draw_steps: expected >= 1, got {draw_steps}")
        self.name, self.column, self.k = name, column, k
        self.seed, self.rank = seed, rank
        self.weight_column = weight_column
        self.draw_steps = draw_steps
        groups = layout.groups(column)
        self.counts = np.asarray([sum(r for _, r in files) for files in groups], dtype=np.int64)
        extra = {} if in_memory_rows is None else {"in_memory_rows": in_memory_rows}
        self.streams: list[GroupStream] = []
        for g, files in enumerate(groups, start=1):
            lo, hi = share_bounds(int(self.counts[g - 1]), rank, world_size)
            self.streams.append(
                GroupStream(
                    [path for path, _ in files],
                    share_segments(files, lo, hi),
                    key=(seed, rank, k, g),
                    weight_column=weight_column,
                    window_segments=window_segments,
                    **extra,
                )
            )
        self.max_weight = self._max_weights(dataset) if weight_column else None
        self._keys: dict[int, np.ndarray] = {}
        self._draws: _Draws | None = None
        self._staging = _Staging(self.streams)
        self._table: _GroupTable | None = None
        self._epoch_seeds: dict[int, np.uint64] = {}
        self._p_changed_at: tuple[int, int] | None = None  # (epoch, step) of the last new p
        self._p_interval = 0  # steps between the last two changes of p (0: unknown)

    def _max_weights(self, dataset: PreparedDataset) -> np.ndarray:
        """The largest row weight of each group, from the item table (weights are item columns)."""
        assert self.weight_column is not None  # only thinned objectives have a weight column
        try:
            weight, group = dataset.item_column(self.weight_column), dataset.item_column(self.column)
        except KeyError:
            raise ValueError(
                f"objective {self.name!r}: row weight column {self.weight_column!r} must be a column of "
                f"{dataset.path / 'items.parquet'} with the group column {self.column!r}"
            ) from None
        out = np.zeros(len(self.counts))
        np.maximum.at(out, group[1:].astype(np.int64) - 1, weight[1:].astype(np.float64))
        return out

    def block(self, epoch: int, step: int, p: np.ndarray, size: int) -> np.ndarray:
        """The [size, 2] (user_id, item_id) rows of this objective's block at (epoch, step)."""
        if self.weight_column:
            return self._thinned_block(epoch, step, p, size)
        draws = self._draws
        # the common case first (the run's next step at the same p object): no numpy call
        fast = (
            draws is not None
            and p is draws.p
            and step == draws.first + draws.used
            and draws.used < draws.steps
            and epoch == draws.epoch
            and size == draws.size
        )
        if not fast and (draws is None or not draws.serves(epoch, step, p, size)):
            self._settle()
            draws = self._draws = self._draw(epoch, step, p, size)
        assert draws is not None
        i = draws.used
        draws.used = i + 1
        return draws.blocks[i]

    def _thinned_block(self, epoch: int, step: int, p: np.ndarray, size: int) -> np.ndarray:
        rng = self._step_rng(STREAM_WEIGHTED, epoch, step)
        counts = rng.multinomial(size, p)
        thin = self._step_rng(STREAM_THINNING, epoch, step)
        parts = [self._thinned(self.streams[g], int(counts[g]), g, thin) for g in np.flatnonzero(counts).tolist()]
        pairs = np.concatenate(parts)
        return pairs[rng.permutation(len(pairs))]  # no group-sorted structure inside a block

    def _key(self, stream: int) -> np.ndarray:
        key = self._keys.get(stream)
        if key is None:
            key = self._keys[stream] = np.random.SeedSequence([self.seed, stream, self.rank, self.k]).generate_state(
                2, np.uint64
            )
        return key

    def _step_rng(self, stream: int, epoch: int, step: int) -> np.random.Generator:
        # Counter-based: the key is (seed, stream, rank, k), the counter (epoch, step), so a
        # block's generator costs no seed hashing per step (it runs K times a step).
        counter = np.array([epoch, step, 0, 0], dtype=np.uint64)
        return np.random.Generator(np.random.Philox(key=self._key(stream), counter=counter))

    def _epoch_seed(self, epoch: int) -> np.uint64:
        """The SplitMix64 seed of (seed, rank, k, epoch): step t of that epoch owns outputs
        [t * size, (t + 1) * size) of its stream, so one run of many steps draws exactly
        what one call per step would."""
        seed = self._epoch_seeds.get(epoch)
        if seed is None:
            entropy = [self.seed, STREAM_WEIGHTED, self.rank, self.k, epoch]
            seed = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
            self._epoch_seeds = {epoch: seed}  # epochs only move forward: keep one
        return seed

    def _draw(self, epoch: int, step: int, p: np.ndarray, size: int) -> _Draws:
        if self._table is None or not (p is self._table.p or np.array_equal(p, self._table.p)):
            self._table = _GroupTable.build(np.asarray(p, dtype=np.float64))
            self._note_p_change(epoch, step)
        steps = self._run_steps(epoch, step)
        # cum[i, g]: rows of group g in steps before first + i
        labels, cum = self._table.draw(self._epoch_seed(epoch), step, steps, size)
        # the j-th row labelled g (in step-then-row order) is g's j-th unserved row: one
        # compiled counting-sort pass from the staged rows builds every block of the run
        starts = self._staging.starts(cum[-1])  # first: it may replace the buffer
        rows = kernels.scatter_by_group(labels, self._staging.buf, starts)
        return _Draws(epoch, step, size, p, rows, cum)

    def _note_p_change(self, epoch: int, step: int) -> None:
        last = self._p_changed_at
        if last is not None and last[0] == epoch and step > last[1]:
            self._p_interval = step - last[1]
        self._p_changed_at = (epoch, step)

    def _run_steps(self, epoch: int, step: int) -> int:
        """Steps to draw from ``step``: ``draw_steps``, cut at the next change of p that the
        last two changes predict (the coordinator updates p every so many steps). A change
        drops the rest of a run, which at 64-step runs and a change every 200 steps was 28%
        of all draws and scatters. Any run length gives the same blocks."""
        last, interval = self._p_changed_at, self._p_interval
        if last is not None and interval and last[0] == epoch:
            ahead = last[1] + interval - step
            if 0 < ahead < self.draw_steps:
                return ahead
        return self.draw_steps

    def _settle(self) -> None:
        """Marks the rows of the steps served from the current draws as served (the streams'
        cursors move when the staging is refilled)."""
        draws, self._draws = self._draws, None
        if draws is not None and draws.used:
            self._staging.settle(draws.cum[draws.used])

    def _thinned(self, stream: GroupStream, need: int, g: int, rng: np.random.Generator) -> np.ndarray:
        # Acceptance by w / max w walks the stream and keeps each row with probability
        # proportional to its weight: the kept rows follow w within the group, exactly.
        kept: list[np.ndarray] = []
        assert self.max_weight is not None  # set with the weight column
        top = self.max_weight[g]
        for _ in range(MAX_THINNING_ROUNDS):
            m = max(4 * need, 256)
            chunk = stream.peek(m)
            accepted = np.flatnonzero(rng.random(m) * top < chunk.weights)
            if len(accepted) >= need:
                kept.append(chunk.pairs[accepted[:need]])
                stream.advance(int(accepted[need - 1]) + 1)
                return np.concatenate(kept)
            kept.append(chunk.pairs[accepted])
            stream.advance(m)
            need -= len(accepted)
        raise RuntimeError(
            f"objective {self.name!r}: group {g + 1}: thinning by {self.weight_column!r} kept too few rows"
        )

    def cursors(self) -> list[list[int]]:
        """Per group, the (pass, offset) of the next row a block takes (rows drawn for steps
        not yet served count as not taken)."""
        taken = self._staging.pos.copy()
        if self._draws is not None:
            taken += self._draws.cum[self._draws.used]
        out = []
        for g, stream in enumerate(self.streams):
            pass_, offset = stream.cursor()
            if stream.rows == 0:
                out.append([pass_, offset])
                continue
            served = pass_ * stream.rows + offset + int(taken[g])
            out.append([served // stream.rows, served % stream.rows])
        return out

    def seek(self, cursors: Sequence[Sequence[int]]) -> None:
        if len(cursors) != len(self.streams):
            raise ValueError(
                f"reader state: objective {self.name!r} has {len(cursors)} cursors, expected {len(self.streams)}"
            )
        self._draws = None
        self._staging.reset()
        for stream, (pass_, offset) in zip(self.streams, cursors, strict=True):
            stream.seek(int(pass_), int(offset))


# ------------------------------------------------------------------ the reader


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _objective_spec(objective: Sequence[Any]) -> tuple[str, str, str | None]:
    """(name, group column, row weight column or None) from a 2- or 3-tuple."""
    name, column, *rest = objective
    weight = rest[0] if rest else None
    return str(name), str(column), (str(weight) if weight else None)


class Reader:
    """One rank's batches: uniform single-block batches, or MoRec batches of K+1 blocks.

    ``objectives`` are (name, group_column[, row_weight_column]) in block order (block k =
    objective k-1); none means uniform mode (pretraining): single-block batches with
    version -1. Iterating yields the rest of the current epoch and then moves to the next
    one, so ``for epoch ...: for batch in reader: ...`` and resuming mid-epoch both just work.
    """

    def __init__(
        self,
        dataset: PreparedDataset | str | Path | Location,
        *,
        batch_size: int,
        num_negatives: int,
        negative_alpha: float = 1.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        features: FeatureBuilder | None = None,
        objectives: Sequence[Sequence[Any]] = (),
        probabilities: Mapping[str, Sequence[float]] | None = None,
        version: int = 0,
        prefetch_batches: int = 4,
        prefetch_windows: int = 1,
        window_row_groups: int = 4,
        group_window_row_groups: int = 1,
        in_memory_rows: int | None = None,
        exclude_positive_negatives: bool = True,
        exclude_history_negatives: bool = False,
        history_splits: Sequence[str] = HISTORY_SPLITS,
        draw_steps: int = DRAW_STEPS,
    ):
        if not isinstance(dataset, PreparedDataset):
            # Cheap open: the trainer validates the dataset once; a reader per rank need not rehash it.
            dataset = PreparedDataset.open(dataset, verify_checksums=False, verify_values=False)
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if num_negatives < 0:
            raise ValueError(f"num_negatives: expected >= 0, got {num_negatives}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if prefetch_batches < 1:
            raise ValueError(f"prefetch_batches: expected >= 1, got {prefetch_batches}")
        if prefetch_windows < 0:
            raise ValueError(f"prefetch_windows: expected >= 0, got {prefetch_windows}")
        specs = [_objective_spec(o) for o in objectives]
        names = [name for name, _, _ in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: duplicate names in {names}")
        self.dataset = dataset
        self.batch_size, self.num_negatives = batch_size, num_negatives
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.prefetch_batches, self.prefetch_windows = prefetch_batches, prefetch_windows
        self.objectives = [(n, c) for n, c, _ in specs]
        self.features = features or FeatureBuilder(dataset.path, dataset.num_users, dataset.num_items, "ids")
        self.negatives = NegativeSampler.from_dataset(
            dataset,
            negative_alpha,
            exclude_positive=exclude_positive_negatives,
            exclude_history=exclude_history_negatives,
            history_splits=tuple(history_splits),
        )
        self.uniform = UniformStream(
            dataset.split_files("train"),
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            window_row_groups=window_row_groups,
        )
        self.weighted: list[WeightedObjective] = []
        if specs:
            layout = GroupLayout(dataset.path, dataset.manifest)
            for k, (name, column, weight) in enumerate(specs, start=1):
                self.weighted.append(
                    WeightedObjective(
                        dataset,
                        layout,
                        name,
                        column,
                        k,
                        seed=seed,
                        rank=rank,
                        world_size=world_size,
                        weight_column=weight,
                        window_segments=group_window_row_groups,
                        in_memory_rows=in_memory_rows,
                        draw_steps=draw_steps,
                    )
                )
        self._lock = threading.Lock()
        initial = {o.name: o.counts / max(1, o.counts.sum()) for o in self.weighted}
        initial.update(probabilities or {})
        self._snapshot = ProbabilitySnapshot(version, self._validated(version, initial))
        self._epoch, self._step = 0, 0
        self._prefetcher: _PrefetchThread | None = None
        self._window_prefetcher: WindowPrefetcher | None = None

    # ---------------------------------------------------------------- properties
    @property
    def morec(self) -> bool:
        return bool(self.objectives)

    @property
    def num_batches(self) -> int:
        """Batches per epoch on this rank: the same on every rank."""
        return self.uniform.num_batches

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step(self) -> int:
        return self._step

    @property
    def version(self) -> int:
        return self.snapshot().version if self.morec else UNIFORM_VERSION

    def snapshot(self) -> ProbabilitySnapshot:
        with self._lock:
            return self._snapshot

    def probabilities(self) -> dict[str, np.ndarray]:
        snap = self.snapshot()
        return {name: p.copy() for (name, _), p in zip(self.objectives, snap.probabilities, strict=True)}

    # ---------------------------------------------------------------- probabilities
    def _validated(self, version: int, probabilities: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
        known = [name for name, _ in self.objectives]
        unknown = sorted(set(probabilities) - set(known))
        if unknown:
            raise ValueError(
                f"set_probabilities(version={version}): unknown objective(s) {unknown}; expected some of {known}"
            )
        return tuple(validate_probabilities(o.name, o.column, probabilities[o.name], o.counts) for o in self.weighted)

    def set_probabilities(self, version: int, probabilities: Mapping[str, Sequence[float] | np.ndarray]) -> None:
        """Installs a new probabilities version (objectives not named keep their p).

        Takes effect for the next batch the consumer requests. On any validation failure a
        ValueError names the objective and the problem and the previous version stays.
        """
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
            raise ValueError(f"set_probabilities: version must be an integer, got {version!r}")
        with self._lock:
            current = self._snapshot
        merged: dict[str, Sequence[float] | np.ndarray] = {
            name: p for (name, _), p in zip(self.objectives, current.probabilities, strict=True)
        }
        merged.update(probabilities)
        new = self._validated(int(version), merged)
        with self._lock:
            current = self._snapshot
            if version < current.version:
                raise ValueError(
                    f"set_probabilities: version {version} is older than the version in force ({current.version})"
                )
            if version == current.version:
                if all(np.array_equal(a, b) for a, b in zip(new, current.probabilities, strict=True)):
                    return
                raise ValueError(f"set_probabilities: version {version} is already in force with other probabilities")
            self._snapshot = ProbabilitySnapshot(int(version), new)

    # ---------------------------------------------------------------- batches
    def assemble(self, epoch: int, step: int, uniform: np.ndarray, snapshot: ProbabilitySnapshot) -> Batch:
        """The batch of (epoch, step) from its uniform rows and a probabilities snapshot.

        Advances the group streams' cursors: call it once per step, in step order.
        """
        blocks = [uniform]
        for objective, p in zip(self.weighted, snapshot.probabilities, strict=True):
            blocks.append(objective.block(epoch, step, p, self.batch_size))
        pairs = np.concatenate(blocks) if len(blocks) > 1 else uniform
        users = pairs[:, 0].astype(np.int64)
        positives = pairs[:, 1].astype(np.int64)
        block_ids = np.repeat(np.arange(len(blocks), dtype=np.int64), [len(b) for b in blocks])
        negatives = self.negatives.sample(
            _rng(self.seed, STREAM_NEGATIVES, self.rank, epoch, step), positives, self.num_negatives, users=users
        )
        item_ids = np.concatenate([positives[:, None], negatives], axis=1)
        version = snapshot.version if self.morec else UNIFORM_VERSION
        return self.features.batch(users, item_ids, block_ids, version)

    def _start_window_prefetch(self) -> None:
        if self.prefetch_windows and self.weighted and self._window_prefetcher is None:
            streams = [s for o in self.weighted for s in o.streams]
            self._window_prefetcher = WindowPrefetcher(
                streams, self.prefetch_windows, name=f"group-prefetch-r{self.rank}"
            )
            self._window_prefetcher.start()

    def __iter__(self) -> Generator[Batch, None, None]:  # a generator: callers close() it
        self._stop_prefetch()
        self._epoch, self._step = self._position()  # a finished epoch not yet rolled over
        epoch = self._epoch
        prefetcher = _PrefetchThread(self, epoch, self._step)
        self._prefetcher = prefetcher
        prefetcher.start()
        self._start_window_prefetch()
        try:
            while self._step < self.num_batches:
                item = prefetcher.get()
                if isinstance(item, _Failure):
                    raise item.exc
                step, uniform = item
                assert step == self._step, (step, self._step)
                # the weighted blocks are drawn now, with the newest p set before this request
                batch = self.assemble(epoch, step, uniform, self.snapshot())
                self._step += 1
                if self._window_prefetcher is not None:
                    self._window_prefetcher.wake.set()
                yield batch
            self._epoch, self._step = epoch + 1, 0
        finally:
            prefetcher.stop()
            if self._prefetcher is prefetcher:
                self._prefetcher = None

    def set_epoch(self, epoch: int) -> None:
        """Positions the reader at ``epoch`` (like DistributedSampler.set_epoch).

        The current epoch keeps its position, so ``load_state_dict`` then ``set_epoch`` of the
        same epoch resumes mid-epoch; another epoch starts at its first batch. The group
        streams' cursors are not moved: a pass of a group is not tied to an epoch.
        """
        epoch = int(epoch)
        if epoch == self._epoch and self._step < self.num_batches:
            return
        self._stop_prefetch()
        self._epoch, self._step = (epoch, 0) if (epoch, 0) != self._position() else self._position()

    def _stop_prefetch(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None

    def _stop_window_prefetch(self) -> None:
        if self._window_prefetcher is not None:
            self._window_prefetcher.stop()
            self._window_prefetcher = None

    # ---------------------------------------------------------------- checkpointing
    def _position(self) -> tuple[int, int]:
        if self._step >= self.num_batches:
            return self._epoch + 1, 0
        return self._epoch, self._step

    def state_dict(self) -> dict[str, Any]:
        epoch, step = self._position()
        snap = self.snapshot()
        return {
            "format": STATE_FORMAT,
            "epoch": epoch,
            "step": step,
            "version": snap.version,
            "probabilities": {
                name: p.tolist() for (name, _), p in zip(self.objectives, snap.probabilities, strict=True)
            },
            "cursors": {o.name: o.cursors() for o in self.weighted},
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_negatives": self.num_negatives,
            "objectives": [list(o) for o in self.objectives],
            "num_batches": self.num_batches,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues exactly where the reader that wrote ``state`` stopped.

        A state without ``cursors`` (mapped from another world size, whose shares differ)
        starts every group stream at a new pass.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"reader state: format {state.get('format')!r} != {STATE_FORMAT}")
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "batch_size", "num_negatives", "objectives", "num_batches"):
            if state[key] != mine[key]:
                raise ValueError(f"reader state: {key} = {state[key]!r} but this reader has {mine[key]!r}")
        probabilities = self._validated(int(state["version"]), state["probabilities"])
        self._stop_prefetch()
        self._stop_window_prefetch()
        cursors = state.get("cursors")
        for objective in self.weighted:
            if cursors is None:
                objective.seek([[0, 0]] * len(objective.streams))
            else:
                objective.seek(cursors[objective.name])
        with self._lock:
            self._snapshot = ProbabilitySnapshot(int(state["version"]), probabilities)
        self._epoch, self._step = int(state["epoch"]), int(state["step"])

    def close(self) -> None:
        self._stop_prefetch()
        self._stop_window_prefetch()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PrefetchThread(threading.Thread):
    """Reads the next uniform blocks of one epoch ahead of the consumer (data only: no p)."""

    def __init__(self, reader: Reader, epoch: int, start_step: int):
        super().__init__(name=f"reader-prefetch-r{reader.rank}", daemon=True)
        self.reader, self.epoch, self.start_step = reader, epoch, start_step
        self._queue: queue.Queue = queue.Queue(maxsize=reader.prefetch_batches)
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            for step, uniform in self.reader.uniform.iter_batches(self.epoch, self.start_step):
                if not self._put((step, uniform)):
                    return
        except BaseException as exc:
            self._put(_Failure(exc))

    def _put(self, item: object) -> bool:
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> tuple[int, np.ndarray] | _Failure:
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self.is_alive() and self._queue.empty():
                    return _Failure(RuntimeError("reader prefetch thread ended without a batch"))

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=10)
