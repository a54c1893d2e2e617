"""Compiled (numba) loops of the reader's hot paths, each one pass over its rows.

Owns the loops that numpy could only express as several passes with temporaries:

- ``shuffle_rows``: decode-side Fisher-Yates. Interleaves a row group's (user_id, item_id)
  columns into one int64 per row (the layout of an [n, 2] int32 array viewed as int64) and
  permutes them in the same pass ("inside-out" Fisher-Yates), from a counter-based hash
  stream keyed by a 64-bit salt: a pure function of (salt, n).
- ``permutation``: the same permutation of range(n), for rows that carry other columns;
  ``shuffle_pairs``: rows[permutation(n, salt)] of int64 rows in one pass (a resident
  share's pass order, without an index array and a second gather).
- ``draw_groups``: the weighted blocks' group choice: 64-bit uniforms of a counter-based
  SplitMix64 stream, each mapped to its group by the inverse-CDF lookup table (a binary
  search on the rare bucket that holds a CDF edge; ``group_labels`` on given uniforms),
  and the running per-group counts at each step boundary.
- ``lookup_table``: that lookup table of a new p, by two moving pointers (no searches).
- ``scatter_by_group``: the j-th row labelled g (in step-then-row order) gets group g's
  j-th row: a counting sort, replacing a stable argsort and a scatter.
- ``alias_table``: Vose's alias method in O(n) on arrays (no Python lists).

Random integers below ``bound`` use Lemire's multiply-shift with rejection on 32-bit draws,
so every permutation is exactly uniform (given the hash stream) for n < 2**32. Compiled
once per machine and cached on disk (``cache=True``, next to this file in __pycache__, or
under the temp dir where the package is read-only): ~10 s the first time, ~1 s (the numba
import) after; ``warm_up`` compiles every signature the reader uses.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

# The on-disk cache goes next to this file; where the package is read-only (an image run
# with readOnlyRootFilesystem) numba's own fallbacks may be too, so use the temp dir.
if "NUMBA_CACHE_DIR" not in os.environ and not os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK):
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "morec-numba-cache")

from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)
_TWO32 = np.uint64(1 << 32)


@njit(cache=True, inline="always")
def _mix(x):
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@njit(cache=True, inline="always")
def _below(state, bound):
    """(new state, a uniform integer in [0, bound)) for 1 <= bound < 2**32 (Lemire, exact)."""
    state = state + _GOLDEN
    m = (_mix(state) >> np.uint64(32)) * bound
    low = m & _LOW32
    if low < bound:
        threshold = (_TWO32 - bound) % bound
        while low < threshold:
            state = state + _GOLDEN
            m = (_mix(state) >> np.uint64(32)) * bound
            low = m & _LOW32
    return state, m >> np.uint64(32)


@njit(cache=True, nogil=True)
def shuffle_rows(users, items, salt):
    """[n] int64 rows (user_id in the low, item_id in the high 32 bits), in the order of a
    Fisher-Yates permutation keyed by ``salt`` (the order of ``permutation(n, salt)``)."""
    n = users.shape[0]
    out = np.empty(n, np.int64)
    state = np.uint64(salt)
    for i in range(n):
        row = np.int64((np.uint64(np.uint32(items[i])) << np.uint64(32)) | np.uint64(np.uint32(users[i])))
        state, j = _below(state, np.uint64(i + 1))
        out[i] = out[j]
        out[j] = row
    return out


@njit(cache=True, nogil=True)
def shuffle_pairs(rows, salt):
    """``rows[permutation(n, salt)]`` (int64 rows) in one pass: the inside-out Fisher-Yates of
    ``permutation`` applied to the values, so no index array and no second gather pass."""
    n = rows.shape[0]
    out = np.empty(n, np.int64)
    state = np.uint64(salt)
    for i in range(n):
        state, j = _below(state, np.uint64(i + 1))
        out[i] = out[j]
        out[j] = rows[i]
    return out


@njit(cache=True, nogil=True)
def permutation(n, salt):
    """The permutation of range(n) that ``shuffle_rows`` applies for ``salt``."""
    out = np.empty(n, np.int64)
    state = np.uint64(salt)
    for i in range(n):
        state, j = _below(state, np.uint64(i + 1))
        out[i] = out[j]
        out[j] = i
    return out


@njit(cache=True, inline="always")
def _group_of(r, table, cdf, last, shift):
    """searchsorted(cdf, u, "right") capped at ``last``, u = (r >> 11) * 2**-53 (the double
    numpy's random() makes of r): the table's bucket, or a binary search in a mixed one."""
    g = np.int64(table[r >> shift])
    if g < 0:
        u = np.float64(r >> np.uint64(11)) * 2.0**-53
        lo, hi = 0, cdf.shape[0]
        while lo < hi:
            mid = (lo + hi) >> 1
            if cdf[mid] <= u:
                lo = mid + 1
            else:
                hi = mid
        g = min(lo, last)
    return g


@njit(cache=True, nogil=True)
def group_labels(raw, table, cdf, last, shift):
    """The group (int16) of each raw 64-bit uniform."""
    labels = np.empty(raw.shape[0], np.int16)
    for i in range(raw.shape[0]):
        labels[i] = _group_of(raw[i], table, cdf, last, shift)
    return labels


@njit(cache=True, nogil=True)
def draw_groups(seed, first, steps, size, table, cdf, last, groups, shift):
    """(labels [steps * size] int16, cum [steps + 1, groups] int64) of steps first.., ``size``
    rows each: row i of step t draws from output t * size + i of the SplitMix64 stream of
    ``seed`` (a counter-based generator, so any step is reached in O(1)), and cum[s, g] counts
    group g's rows in the first s steps."""
    n = steps * size
    base = np.uint64(seed) + np.uint64(first) * np.uint64(size) * _GOLDEN
    # Pass 1: each uniform's table bucket. No table gather in this loop, so it vectorises
    # (a fused loop ran ~1.6x slower).
    bucket = np.empty(n, np.uint32)
    for i in range(n):
        bucket[i] = np.uint32(_mix(base + np.uint64(i + 1) * _GOLDEN) >> shift)
    # Pass 2, per step: the table's group (-1 in the few buckets a cdf edge crosses, resolved
    # by the binary search) and the step's counts, in four interleaved histograms: one
    # running count would make each row wait for the previous row's store whenever they
    # share a group, which skewed p makes the common case.
    labels = np.empty(n, np.int16)
    cum = np.zeros((steps + 1, groups), np.int64)
    h = np.zeros((4, groups + 1), np.int64)  # column g + 1 counts group g, column 0 the mixed buckets
    for s in range(steps):
        h[:] = 0
        lo, hi = s * size, (s + 1) * size
        i = lo
        while i + 4 <= hi:
            a, b, c, d = table[bucket[i]], table[bucket[i + 1]], table[bucket[i + 2]], table[bucket[i + 3]]
            labels[i], labels[i + 1], labels[i + 2], labels[i + 3] = a, b, c, d
            h[0, a + 1] += 1
            h[1, b + 1] += 1
            h[2, c + 1] += 1
            h[3, d + 1] += 1
            i += 4
        while i < hi:
            a = table[bucket[i]]
            labels[i] = a
            h[0, a + 1] += 1
            i += 1
        if h[0, 0] + h[1, 0] + h[2, 0] + h[3, 0]:
            for i in range(lo, hi):
                if labels[i] < 0:
                    g = _group_of(_mix(base + np.uint64(i + 1) * _GOLDEN), table, cdf, last, shift)
                    labels[i] = g
                    h[0, g + 1] += 1
        for g in range(groups):
            cum[s + 1, g] = cum[s, g] + h[0, g + 1] + h[1, g + 1] + h[2, g + 1] + h[3, g + 1]
    return labels, cum


@njit(cache=True, nogil=True)
def lookup_table(cdf, last, lower, upper):
    """table[b] = the group of bucket b's uniforms in [lower[b], upper[b]] when they all map
    to one (searchsorted(cdf, u, "right") capped at ``last``), else -1: two moving pointers
    over the sorted edges, O(buckets + groups)."""
    buckets = lower.shape[0]
    table = np.empty(buckets, np.int16)
    n = cdf.shape[0]
    lo_g, hi_g = 0, 0
    for b in range(buckets):
        while lo_g < n and cdf[lo_g] <= lower[b]:
            lo_g += 1
        while hi_g < n and cdf[hi_g] <= upper[b]:
            hi_g += 1
        a, c = min(lo_g, last), min(hi_g, last)
        table[b] = a if a == c else -1
    return table


@njit(cache=True, nogil=True)
def scatter_by_group(labels, source, starts):
    """rows[i] = source[starts[g] + j] for the j-th i (in order) with labels[i] == g."""
    n = labels.shape[0]
    rows = np.empty(n, np.int64)
    position = starts.copy()
    for i in range(n):
        g = labels[i]
        rows[i] = source[position[g]]
        position[g] += 1
    return rows


@njit(cache=True, nogil=True)
def alias_table(p):
    """Vose's alias table for ``p`` (sums to 1): column i keeps i with probability accept[i],
    else gives alias[i]. Exact: each column carries mass 1/n, split between two outcomes."""
    n = p.shape[0]
    scaled = p * n
    accept = np.ones(n, np.float64)
    alias = np.arange(n)
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns, nl = 0, 0
    for i in range(n):
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        nl -= 1
        s, g = small[ns], large[nl]
        accept[s], alias[s] = scaled[s], g
        scaled[g] -= 1.0 - scaled[s]
        if scaled[g] < 1.0:
            small[ns] = g
            ns += 1
        else:
            large[nl] = g
            nl += 1
    # leftovers are 1 up to rounding: they keep themselves (accept = 1)
    return accept, alias


def warm_up() -> None:
    """Compiles (or loads from the on-disk cache) every signature the reader calls."""
    ids = np.arange(4, dtype=np.int32)
    shuffle_rows(ids, ids, np.uint64(1))
    permutation(4, np.uint64(1))
    shuffle_pairs(np.arange(4, dtype=np.int64), np.uint64(1))
    raw = np.arange(8, dtype=np.uint64)
    group_labels(raw, np.zeros(4, np.int16), np.ones(1), 0, np.uint64(62))
    draw_groups(np.uint64(1), 0, 2, 4, np.zeros(4, np.int16), np.ones(1), 0, 1, np.uint64(62))
    lookup_table(np.ones(1), 0, np.zeros(4), np.ones(4))
    scatter_by_group(np.zeros(4, np.int16), np.arange(4, dtype=np.int64), np.zeros(1, np.int64))
    alias_table(np.full(4, 0.25))
