"""The reader's compiled loops (morec_dist/data/kernels.py): exact permutations, the same
order for rows and for their other columns, the alias table's mass, and the group choice
against a binary search over the same uniforms."""

from __future__ import annotations

import itertools

import numpy as np
from scipy import stats

from morec_dist.data import kernels
from morec_dist.data.reader import LOOKUP_BITS, _GroupTable

ALPHA = 1e-3


def test_permutation_is_uniform_over_all_orders():
    """n = 4: every one of the 24 orders is equally likely over 48k salts (chi-square), and
    each is a permutation."""
    index = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
    counts = np.zeros(len(index), dtype=np.int64)
    salts = np.random.default_rng(0).integers(1, 2**63, 48_000, dtype=np.uint64)
    for salt in salts:
        counts[index[tuple(kernels.permutation(4, salt).tolist())]] += 1
    assert stats.chisquare(counts).pvalue > ALPHA


def test_shuffle_rows_applies_the_permutation_of_its_salt():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 2**31 - 1, 5000).astype(np.int32)
    items = rng.integers(0, 2**31 - 1, 5000).astype(np.int32)
    salt = np.uint64(0xDEADBEEF12345)
    rows = kernels.shuffle_rows(users, items, salt).view(np.int32).reshape(-1, 2)
    perm = kernels.permutation(len(users), salt)
    assert np.array_equal(np.sort(perm), np.arange(len(users)))
    assert np.array_equal(rows[:, 0], users[perm]) and np.array_equal(rows[:, 1], items[perm])
    other = kernels.shuffle_rows(users, items, salt + np.uint64(1)).view(np.int32).reshape(-1, 2)
    assert not np.array_equal(rows, other)


def test_alias_table_carries_exactly_p():
    rng = np.random.default_rng(2)
    for p in (rng.dirichlet(np.full(1000, 0.1)), np.asarray([1.0]), np.asarray([0.0, 0.5, 0.0, 0.5])):
        accept, alias = kernels.alias_table(p)
        n = len(p)
        mass = accept / n
        np.add.at(mass, alias, (1 - accept) / n)
        assert np.allclose(mass, p, atol=1e-12)


def test_draw_groups_equals_a_binary_search_of_its_uniforms():
    """draw_groups's labels are searchsorted(cdf, u, "right") of the SplitMix64 outputs of
    its steps, and cum counts them per step; a later first step is the same stream shifted."""
    p = np.random.default_rng(3).dirichlet(np.full(50, 0.3))
    table = _GroupTable.build(p)
    seed, size, steps = np.uint64(12345), 300, 7
    labels, cum = table.draw(seed, 4, steps, size)
    golden, m1, m2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
    with np.errstate(over="ignore"):
        x = seed + (np.uint64(4 * size) + np.arange(1, steps * size + 1, dtype=np.uint64)) * golden
        x = (x ^ (x >> np.uint64(30))) * m1
        x = (x ^ (x >> np.uint64(27))) * m2
        raw = x ^ (x >> np.uint64(31))
    u = (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53
    expected = np.minimum(np.searchsorted(table.cdf, u, side="right"), table.last)
    assert np.array_equal(labels, expected)
    assert np.array_equal(cum[1:] - cum[:-1], [np.bincount(s, minlength=50) for s in expected.reshape(steps, size)])
    later, _ = table.draw(seed, 6, steps - 2, size)
    assert np.array_equal(later, labels[2 * size :])
    assert table.table.shape == (1 << LOOKUP_BITS,)


def test_scalar_salt_equals_the_vectorised_salts():
    """GroupStream.salt (Python ints, per window / resident pass) is the same hash as the
    numpy _salts the tiny shares' vectorised permutations use."""
    from morec_dist.data.group_streams import STREAM_PASS_ORDER, STREAM_PASS_ROWS, GroupStream

    stream = GroupStream([], [], key=(11, 0, 2, 7))
    for tag in (STREAM_PASS_ORDER, STREAM_PASS_ROWS):
        for w in (0, 1, 5, 2**40):
            passes = [0, 1, 2, 3, 1000, 2**33]
            expected = stream._salts(tag, passes, w)
            assert [stream.salt(tag, q, w) for q in passes] == expected.tolist()
