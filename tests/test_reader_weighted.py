"""Weighted (group-first) blocks over per-group streams: exact group choice, each row once
per pass, ranks' shares partition each group, thinning by price, prefetch-independent.

The chi-square checks run on real blocks from real per-group Parquet streams; each uses a
fixed seed, so a pass or fail is reproducible, and a negative control shows the test
detects a sampler that is off by a small amount.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.group_streams import GroupLayout, GroupLayoutError
from morec_dist.data.negatives import NegativeSampler
from morec_dist.data.reader import Reader
from tests import reader_data

ALPHA = 1e-3  # reject at p < 0.001
DRAWS = 300_000
BLOCK = 5000

SKEWED: dict[str, Any] = {
    "proportional": None,  # filled from the group sizes
    "tiny_heavy": [0.01, 0.02, 0.02, 0.05, 0.1, 0.2, 0.6, 0.0],
    "tiny_light": [0.9, 0.04, 0.03, 0.02, 0.005, 0.004, 0.001, 0.0],
    "sparse": [0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return reader_data.build(tmp_path_factory.mktemp("weighted") / "ds")


@pytest.fixture(scope="module")
def dataset(data_dir) -> PreparedDataset:
    return PreparedDataset.open(data_dir)


@pytest.fixture(scope="module")
def train(data_dir) -> np.ndarray:
    return reader_data.train_pairs(data_dir)


def _p(name: str, counts: np.ndarray) -> np.ndarray:
    p = SKEWED[name]
    return counts / counts.sum() if p is None else np.asarray(p, dtype=np.float64)


def _group_chi2(groups: np.ndarray, p: np.ndarray) -> float:
    support = np.flatnonzero(p > 0)
    observed = np.bincount(groups - 1, minlength=len(p))
    assert observed[p == 0].sum() == 0, "a group with zero probability was drawn"
    return stats.chisquare(observed[support], len(groups) * p[support]).pvalue


FAIR_OF_ITEM = np.concatenate([[0], reader_data._item_groups()[0]])  # by item_id
COUNTS = np.bincount(reader_data._item_groups()[0], weights=reader_data._item_groups()[2], minlength=9)[1:]


def _fair_reader(data_dir, **kwargs) -> Reader:
    args: dict[str, Any] = dict(batch_size=8, num_negatives=1, seed=11, objectives=[("fairness", "fair_group")])
    args.update(kwargs)
    return Reader(data_dir, **args)


def _draw_groups(reader: Reader, p: np.ndarray, draws: int = DRAWS) -> tuple[np.ndarray, np.ndarray]:
    """(group, row key) of ``draws`` rows of objective 1's blocks, at steps 0, 1, ..."""
    objective = reader.weighted[0]
    pairs = np.concatenate([objective.block(0, step, p, BLOCK) for step in range(draws // BLOCK)])
    return FAIR_OF_ITEM[pairs[:, 1]], reader_data.row_keys(pairs[:, 0], pairs[:, 1])


def test_layout_holds_exactly_each_groups_rows(dataset, train):
    layout = GroupLayout(dataset.path, dataset.manifest)
    counts = np.bincount(train[:, 2], minlength=reader_data.FAIR_GROUPS + 1)[1:]
    assert layout.counts("fair_group").tolist() == counts.tolist()
    assert counts[reader_data.FAIR_GROUPS - 1] == 0 and counts[reader_data.TINY_GROUP - 1] == 3
    with pytest.raises(GroupLayoutError, match="no column 'no_such_column'"):
        layout.groups("no_such_column")
    with pytest.raises(GroupLayoutError, match="no 'group_layout'"):
        GroupLayout(dataset.path, {k: v for k, v in dataset.manifest.items() if k != "group_layout"})


@pytest.mark.parametrize("name", list(SKEWED))
def test_group_frequencies_match_p(data_dir, name):
    with _fair_reader(data_dir) as reader:
        p = _p(name, COUNTS.astype(float))
        groups, _ = _draw_groups(reader, p)
    assert _group_chi2(groups, p) > ALPHA


def test_group_chi2_detects_a_slightly_wrong_sampler(data_dir):
    """Negative control: blocks from p perturbed by 0.005 on two groups must be rejected."""
    p = _p("tiny_heavy", COUNTS.astype(float))
    wrong = p.copy()
    wrong[0] += 0.005
    wrong[6] -= 0.005
    with _fair_reader(data_dir) as reader:
        groups, _ = _draw_groups(reader, wrong)
    assert _group_chi2(groups, p) < ALPHA


def test_each_row_once_per_pass_of_its_group(data_dir, train):
    """Over many steps at skewed p, every row of a group is drawn floor or ceil of
    (drawn from the group / group size) times: no row repeats before its group's pass ends."""
    truth = reader_data.row_keys(train[:, 0], train[:, 1])
    for in_memory_rows in (None, 100):  # whole shares in memory; windows of one row group
        with _fair_reader(data_dir, in_memory_rows=in_memory_rows) as reader:
            groups, keys = _draw_groups(reader, _p("tiny_heavy", COUNTS.astype(float)), 100_000)
        for g in range(1, reader_data.TINY_GROUP + 1):
            members = truth[train[:, 2] == g]
            drawn = Counter(keys[groups == g].tolist())
            assert set(drawn) <= set(members.tolist()), f"group {g}: a drawn row is not in the group"
            n, total = len(members), int((groups == g).sum())
            per_row = np.asarray([drawn.get(k, 0) for k in members.tolist()])
            assert per_row.min() == total // n and per_row.max() == -(-total // n), (g, in_memory_rows)


def test_rank_shares_partition_each_group(data_dir, train):
    truth = reader_data.row_keys(train[:, 0], train[:, 1])
    for world in (1, 3):
        shares: dict[int, list[np.ndarray]] = {}
        for rank in range(world):
            with _fair_reader(data_dir, rank=rank, world_size=world, in_memory_rows=300) as reader:
                for g, stream in enumerate(reader.weighted[0].streams, start=1):
                    pairs = stream.take(stream.rows).pairs
                    shares.setdefault(g, []).append(reader_data.row_keys(pairs[:, 0], pairs[:, 1]))
        for g, parts in shares.items():
            union = np.sort(np.concatenate(parts))
            assert np.array_equal(union, np.sort(truth[train[:, 2] == g])), (world, g)  # disjoint and complete
            sizes = [len(x) for x in parts]
            assert max(sizes) - min(sizes) <= 1


def test_pass_order_is_uniform_and_changes_every_pass(data_dir, train):
    """The first row of each pass of a group (held in memory) is uniform over its rows, and
    a windowed stream permutes differently per pass too."""
    g = 6  # 60 rows
    members = np.sort(reader_data.row_keys(*train[train[:, 2] == g][:, :2].T))
    with _fair_reader(data_dir) as reader:
        stream = reader.weighted[0].streams[g - 1]
        assert stream.in_memory and stream.rows == len(members)
        firsts, orders = [], set()
        for _ in range(3000):
            pairs = stream.take(stream.rows).pairs
            keys = reader_data.row_keys(pairs[:, 0], pairs[:, 1])
            assert np.array_equal(np.sort(keys), members)
            firsts.append(np.searchsorted(members, keys[0]))
            orders.add(keys.tobytes())
    assert len(orders) == 3000
    assert stats.chisquare(np.bincount(firsts, minlength=len(members))).pvalue > ALPHA
    with _fair_reader(data_dir, in_memory_rows=0) as reader:
        stream = reader.weighted[0].streams[0]  # 10800 rows, row groups of 2048
        assert not stream.in_memory and len(stream.segments) >= 5
        a, b = stream.take(stream.rows).pairs, stream.take(stream.rows).pairs
    assert not np.array_equal(a, b) and np.array_equal(np.sort(a[:, 0] * 41 + a[:, 1]), np.sort(b[:, 0] * 41 + b[:, 1]))


def _stream_of_batches(data_dir, steps: int, **kwargs) -> list:
    out = []
    with _reader(data_dir, **kwargs) as reader:
        it = iter(reader)
        for step in range(steps):
            if step % 4 == 2:  # p changes every few steps, between requests
                reader.set_probabilities(
                    step, {"fairness": SKEWED["tiny_heavy"] if step % 8 == 2 else SKEWED["tiny_light"]}
                )
            out.append(next(it))
    return out


def test_batches_do_not_depend_on_prefetch_depth(data_dir):
    shallow = _stream_of_batches(data_dir, 12, prefetch_batches=1, prefetch_windows=0, in_memory_rows=300)
    deep = _stream_of_batches(data_dir, 12, prefetch_batches=6, prefetch_windows=4, in_memory_rows=300)
    for a, b in zip(shallow, deep, strict=True):
        assert a.version == b.version
        assert np.array_equal(a.item_ids.numpy(), b.item_ids.numpy()) and np.array_equal(
            a.user_ids.numpy(), b.user_ids.numpy()
        )


def _blocks_and_cursors(data_dir, draw_steps: int, in_memory_rows: int | None) -> tuple[list, list]:
    """Blocks of 40 steps of objective 1 (p changes at steps 5, 6 and 23, epoch 1 from
    step 30), and the cursors a checkpoint would hold after each."""
    with _fair_reader(data_dir, draw_steps=draw_steps, in_memory_rows=in_memory_rows) as reader:
        objective = reader.weighted[0]
        p, blocks, cursors = _p("tiny_heavy", COUNTS.astype(float)), [], []
        for step in range(40):
            if step in (5, 6, 23):
                p = _p(["tiny_light", "sparse", "proportional"][(5, 6, 23).index(step)], COUNTS.astype(float))
            epoch, at = (0, step) if step < 30 else (1, step - 30)
            blocks.append(objective.block(epoch, at, p, 700).copy())
            cursors.append(objective.cursors())
    return blocks, cursors


def test_blocks_do_not_depend_on_draw_steps(data_dir):
    """Steps drawn one at a time or many at once give the same blocks and the same cursors,
    across changes of p and an epoch change, for resident and windowed streams."""
    for in_memory_rows in (None, 100):
        one, cursors_one = _blocks_and_cursors(data_dir, 1, in_memory_rows)
        for draw_steps in (3, 64):
            many, cursors_many = _blocks_and_cursors(data_dir, draw_steps, in_memory_rows)
            assert cursors_many == cursors_one, (draw_steps, in_memory_rows)
            for step, (a, b) in enumerate(zip(one, many, strict=True)):
                assert np.array_equal(a, b), (draw_steps, in_memory_rows, step)


def test_runs_end_at_the_next_change_of_p_the_last_two_predict(data_dir):
    """With p changing every 10 steps, runs of up to 64 steps are cut where the next change
    is due (no drawn step is discarded), and the blocks are those of one step at a time."""
    settings = [_p(name, COUNTS.astype(float)) for name in ("tiny_heavy", "sparse", "proportional")]
    served = {}
    for draw_steps in (1, 64):
        with _fair_reader(data_dir, draw_steps=draw_steps, in_memory_rows=100) as reader:
            objective, blocks, runs = reader.weighted[0], [], []
            for step in range(45):
                blocks.append(objective.block(0, step, settings[(step // 10) % 3], 300).copy())
                runs.append(objective._draws.steps)
            served[draw_steps] = blocks
    assert runs[:10] == [64] * 10  # one change seen: nothing to predict from
    assert runs[10] == 10 and runs[20] == 10 and runs[30] == 10
    for step, (a, b) in enumerate(zip(served[1], served[64], strict=True)):
        assert np.array_equal(a, b), step


def test_resume_mid_draw_continues_the_same_blocks(data_dir):
    """A checkpoint taken in the middle of a run of drawn steps (cursors lag the served rows
    until the run is settled) resumes bit-exact, into a reader with another draw_steps."""
    p = _p("tiny_heavy", COUNTS.astype(float))
    with _fair_reader(data_dir, draw_steps=16, in_memory_rows=100) as reader:
        objective = reader.weighted[0]
        expected = [objective.block(0, s, p, 500).copy() for s in range(30)]
    with _fair_reader(data_dir, draw_steps=16, in_memory_rows=100) as first:
        objective = first.weighted[0]
        for s in range(11):
            objective.block(0, s, p, 500)
        cursors = objective.cursors()
    with _fair_reader(data_dir, draw_steps=5, in_memory_rows=100) as resumed:
        objective = resumed.weighted[0]
        objective.seek(cursors)
        tail = [objective.block(0, s, p, 500) for s in range(11, 30)]
    for step, (a, b) in enumerate(zip(expected[11:], tail, strict=True), start=11):
        assert np.array_equal(a, b), step


def test_staged_rows_stay_bounded_when_p_moves_its_mass(data_dir):
    """The staging of a run's rows gives each group a region sized to its need; when p moves
    its mass from group to group, the regions of groups no longer heavy are cut back, so the
    buffer stays at G x STAGE_ROWS plus a few runs instead of growing to G heavy regions."""
    from morec_dist.data.reader import STAGE_ROWS

    size, draw_steps = 1000, 64
    run = size * draw_steps
    with _fair_reader(data_dir, draw_steps=draw_steps) as reader:
        objective = reader.weighted[0]
        groups = len(objective.streams)
        for step in range(7 * 70):
            heavy = step // 70  # groups 1..7 in turn (group 8 is empty)
            p = np.where(COUNTS > 0, 0.005, 0.0)
            p[heavy] = 1.0
            objective.block(0, step, p / p.sum(), size)
            assert objective._staging.buf.size <= groups * STAGE_ROWS + 4 * run + 2 * run, step


def test_group_choice_lookup_matches_binary_search():
    """The lookup table's group of every uniform equals searchsorted(cdf, u, "right") on the
    double numpy's random() makes, including at bucket boundaries and zero-p groups."""
    from morec_dist.data.reader import LOOKUP_BITS, _GroupTable

    rng = np.random.default_rng(5)
    for p in (np.asarray([0.0, 0.3, 0.0, 0.7, 0.0]), rng.dirichlet(np.full(100, 0.2)), np.asarray([1.0])):
        table = _GroupTable.build(p / p.sum())
        raw = rng.integers(0, 2**64, 200_000, dtype=np.uint64, endpoint=False)
        # uniforms right at and next to bucket edges and cdf values
        edges = (np.arange(1 << LOOKUP_BITS, dtype=np.uint64) << np.uint64(64 - LOOKUP_BITS)).astype(np.uint64)
        near = (np.clip(table.cdf, 0, 1 - 2**-53) * 2.0**53).astype(np.uint64) << np.uint64(11)
        raw = np.concatenate([raw, edges, edges - np.uint64(1 << 11), near, near - np.uint64(1 << 11)])
        u = (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53
        expected = np.minimum(np.searchsorted(table.cdf, u, side="right"), table.last)
        got = table.groups(raw)
        assert np.array_equal(got, expected)
        assert (p[got] > 0).all()


@pytest.mark.parametrize("weighting", [None, "price"])
def test_price_weighting_exact_thins_rows_by_price(data_dir, dataset, train, weighting):
    """With row weight "price" (revenue's price_weighting = "exact") rows within a group are
    kept with probability price / max price: item frequencies follow rows x price; without
    it they follow rows. Each test rejects the other case."""
    price = dataset.item_column("price")
    rev = dataset.item_column("rev_group")
    rows_per_item = np.bincount(train[:, 1], minlength=reader_data.NUM_ITEMS + 1)
    with Reader(
        data_dir, batch_size=8, num_negatives=1, seed=3, objectives=[("revenue", "rev_group", weighting)]
    ) as reader:
        p = np.asarray([0.25, 0.25, 0.25, 0.25])
        objective = reader.weighted[0]
        pairs = np.concatenate([objective.block(0, s, p, 2000) for s in range(60)])
    items = np.bincount(pairs[:, 1], minlength=reader_data.NUM_ITEMS + 1)
    pvalues = {}
    for g in range(1, reader_data.REV_GROUPS + 1):
        members = np.flatnonzero(rev == g)
        members = members[members > 0]
        for model, weight in (("rows", rows_per_item), ("price", rows_per_item * price)):
            expected = weight[members] / weight[members].sum() * items[members].sum()
            pvalues.setdefault(model, []).append(stats.chisquare(items[members], expected).pvalue)
    right, wrong = ("price", "rows") if weighting else ("rows", "price")
    assert min(pvalues[right]) > ALPHA / 4
    assert max(pvalues[wrong]) < ALPHA


def test_negatives_follow_popularity_power(dataset):
    popularity = dataset.item_column("popularity")
    sampler = NegativeSampler(popularity, 0.5, exclude_positive=False)
    draws = sampler.sample(np.random.default_rng(3), np.ones(40_000, dtype=np.int64), 10).ravel()
    assert draws.min() >= 1 and draws.max() <= dataset.num_items
    expected = popularity[1:] ** 0.5
    observed = np.bincount(draws - 1, minlength=dataset.num_items)
    assert stats.chisquare(observed, len(draws) * expected / expected.sum()).pvalue > ALPHA
    excluding = NegativeSampler(popularity, 1.0).sample(np.random.default_rng(4), np.ones(10_000, dtype=np.int64), 5)
    assert not (excluding == 1).any()  # item 1 is every row's positive here


# ------------------------------------------------------------------ the MoRec reader


OBJECTIVES = [("fairness", "fair_group"), ("revenue", "rev_group")]


def _reader(data_dir, **kwargs) -> Reader:
    args: dict[str, Any] = dict(batch_size=256, num_negatives=3, seed=11, objectives=OBJECTIVES, prefetch_batches=3)
    args.update(kwargs)
    return Reader(data_dir, **args)


def test_morec_batch_layout(data_dir, train):
    with _reader(data_dir, probabilities={"fairness": SKEWED["sparse"]}) as reader:
        batch = next(iter(reader))
    b = 256
    assert batch.version == 0
    assert batch.block_ids.tolist() == [0] * b + [1] * b + [2] * b
    assert batch.item_ids.shape == (3 * b, 4)
    group_of_item = np.zeros(reader_data.NUM_ITEMS + 1, dtype=np.int64)
    group_of_item[train[:, 1]] = train[:, 2]
    fairness_items = batch.item_ids[b : 2 * b, 0].numpy()
    assert set(group_of_item[fairness_items].tolist()) <= {2, 7}
    assert batch.user_kjt.keys() == ["user_id"]
    assert batch.user_kjt.to_dict()["user_id"].values().tolist() == batch.user_ids.tolist()
    assert batch.item_kjt.to_dict()["item_id"].values().tolist() == batch.item_ids.reshape(-1).tolist()


def _one_hot(group: int, size: int = reader_data.FAIR_GROUPS) -> list[float]:
    p = [0.0] * size
    p[group - 1] = 1.0
    return p


@pytest.mark.parametrize(
    "p, problem",
    [
        ([0.5, 0.5], "expected 8 probabilities"),
        ([0.2, 0.2, 0.2, 0.2, 0.2, 0.2, -0.2, 0.0], "negative at groups \\[7\\]"),
        ([0.2, float("nan"), 0.2, 0.2, 0.2, 0.2, 0.2, 0.0], "NaN/inf at groups \\[2\\]"),
        ([0.0] * 8, "all zero"),
        ([0.5, 0, 0, 0, 0, 0, 0, 0.5], "groups \\[8\\], which have no train rows"),
    ],
)
def test_invalid_probabilities_are_rejected_and_previous_version_stays(data_dir, p, problem):
    with _reader(data_dir, probabilities={"fairness": _one_hot(3)}) as reader:
        with pytest.raises(ValueError, match=f"objective 'fairness' \\(group column 'fair_group'\\): .*{problem}"):
            reader.set_probabilities(1, {"fairness": p})
        assert reader.version == 0
        batch = next(iter(reader))
        assert batch.version == 0
        group_of_item = np.asarray(reader_data._item_groups()[0])
        assert set(group_of_item[batch.item_ids[256:512, 0].numpy() - 1].tolist()) == {3}


def test_unknown_objective_and_stale_version_are_rejected(data_dir):
    with _reader(data_dir, version=5) as reader:
        with pytest.raises(ValueError, match="unknown objective"):
            reader.set_probabilities(6, {"nope": [1.0]})
        with pytest.raises(ValueError, match="older than the version in force"):
            reader.set_probabilities(4, {"fairness": _one_hot(1)})
        reader.set_probabilities(6, {"fairness": _one_hot(1)})
        with pytest.raises(ValueError, match="already in force"):
            reader.set_probabilities(6, {"fairness": _one_hot(2)})
        assert reader.version == 6


def test_batch_uses_newest_version_set_before_its_request(data_dir):
    """Even with batches prefetched under the old version, step t serves the newest one."""
    group_of_item = np.asarray(reader_data._item_groups()[0])
    with _reader(data_dir, probabilities={"fairness": _one_hot(1)}, prefetch_batches=4) as reader:
        it = iter(reader)
        for step in range(12):
            if step % 3 == 0:
                reader.set_probabilities(step + 1, {"fairness": _one_hot(step % 6 + 1)})
                expected_version, expected_group = step + 1, step % 6 + 1
            batch = next(it)
            assert batch.version == expected_version
            assert set(group_of_item[batch.item_ids[256:512, 0].numpy() - 1].tolist()) == {expected_group}


def test_versions_never_mix_within_a_batch_under_concurrent_updates(data_dir):
    group_of_item = np.asarray(reader_data._item_groups()[0])
    stop = threading.Event()
    errors: list[BaseException] = []
    with _reader(data_dir, probabilities={"fairness": _one_hot(1)}, prefetch_batches=2) as reader:

        def updater() -> None:
            version = 1
            try:
                while not stop.is_set():
                    reader.set_probabilities(version, {"fairness": _one_hot(version % 6 + 1)})
                    version += 1
            except BaseException as exc:  # any error: the test thread asserts there were none
                errors.append(exc)

        thread = threading.Thread(target=updater)
        thread.start()
        seen = set()
        try:
            for batch in itertools.islice(reader, 40):
                groups = set(group_of_item[batch.item_ids[256:512, 0].numpy() - 1].tolist())
                assert groups == {batch.version % 6 + 1}, (batch.version, groups)
                seen.add(batch.version)
        finally:
            stop.set()
            thread.join()
        assert not errors
        assert len(seen) > 1  # updates really interleaved with reading
