"""Weighted (group-first) sampling: exact in distribution, versioned, validated, bounded.

The chi-square checks run on real draws from the real group index over real Parquet; each
uses a fixed seed, so a pass or fail is reproducible, and a negative control shows the test
detects a sampler that is off by a small amount.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import reader_data
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.group_index import GroupIndex, GroupIndexError, GroupSampler, ensure_group_index, open_group_index
from morec_dist.data.negatives import NegativeSampler
from morec_dist.data.reader import Reader

ALPHA = 1e-3  # reject at p < 0.001
DRAWS = 300_000

SKEWED = {
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
def fair_index(dataset) -> GroupIndex:
    index = open_group_index(dataset, "fair_group")
    yield index
    index.close()


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


def test_index_strata_hold_exactly_each_groups_rows(fair_index, train):
    counts = np.bincount(train[:, 2], minlength=reader_data.FAIR_GROUPS + 1)[1:]
    assert fair_index.counts.tolist() == counts.tolist()
    assert fair_index.counts[reader_data.FAIR_GROUPS - 1] == 0  # the empty group
    assert fair_index.counts[reader_data.TINY_GROUP - 1] == 3
    truth = reader_data.row_keys(train[:, 0], train[:, 1])
    for g in range(1, reader_data.FAIR_GROUPS + 1):
        lo, hi = fair_index.strata.starts[g - 1], fair_index.strata.starts[g]
        pairs = fair_index.gather(np.arange(lo, hi))
        expected = np.sort(truth[train[:, 2] == g])
        assert np.array_equal(np.sort(reader_data.row_keys(pairs[:, 0], pairs[:, 1])), expected)


@pytest.mark.parametrize("name", list(SKEWED))
def test_group_frequencies_match_p(fair_index, name):
    sampler = GroupSampler(fair_index)
    p = _p(name, fair_index.counts.astype(float))
    groups, _ = sampler.draw_positions(np.random.default_rng(101), p, DRAWS)
    assert _group_chi2(groups, p) > ALPHA


def test_group_chi2_detects_a_slightly_wrong_sampler(fair_index):
    """Negative control: draws from p perturbed by 0.005 on two groups must be rejected."""
    sampler = GroupSampler(fair_index)
    p = _p("tiny_heavy", fair_index.counts.astype(float))
    wrong = p.copy()
    wrong[0] += 0.005
    wrong[6] -= 0.005
    groups, _ = sampler.draw_positions(np.random.default_rng(101), wrong, DRAWS)
    assert _group_chi2(groups, p) < ALPHA


@pytest.mark.parametrize("name", ["tiny_heavy", "proportional"])
def test_rows_are_uniform_within_each_group(fair_index, train, name):
    """Gathered rows are real rows of the drawn group, each equally likely (incl. the tiny group)."""
    sampler = GroupSampler(fair_index)
    p = _p(name, fair_index.counts.astype(float))
    rng = np.random.default_rng(202)
    groups, positions = sampler.draw_positions(rng, p, DRAWS)
    pairs = fair_index.gather(positions)
    keys = reader_data.row_keys(pairs[:, 0], pairs[:, 1])
    truth_keys = reader_data.row_keys(train[:, 0], train[:, 1])
    group_of_key = dict(zip(truth_keys.tolist(), train[:, 2].tolist()))
    assert [group_of_key[k] for k in keys[:5000].tolist()] == groups[:5000].tolist()
    pvalues = []
    for g in np.flatnonzero(p > 0) + 1:
        members = np.sort(truth_keys[train[:, 2] == g])
        drawn = keys[groups == g]
        slot = np.searchsorted(members, drawn)
        assert np.array_equal(members[slot], drawn), f"group {g}: drew a row that is not in the group"
        observed = np.bincount(slot, minlength=len(members))
        if len(members) > 1 and drawn.size >= 5 * len(members):
            pvalues.append(stats.chisquare(observed).pvalue)
    assert pvalues and min(pvalues) * len(pvalues) > ALPHA  # Bonferroni over groups


def test_bounded_gather_equals_plain_gather(dataset, fair_index):
    small = GroupIndex(fair_index.path, resident_budget_mb=0.02)  # forces region-by-region reads
    try:
        assert small._bounded and not fair_index._bounded
        positions = np.random.default_rng(5).integers(0, fair_index.strata.rows, 20_000)
        assert np.array_equal(small.gather(positions), fair_index.gather(positions))
    finally:
        small.close()


def test_index_is_cached_and_keyed_by_column_and_content(dataset, tmp_path):
    first = ensure_group_index(dataset, "rev_group", cache_dir=tmp_path)
    stamp = (first / "rows.npy").stat().st_mtime_ns
    assert ensure_group_index(dataset, "rev_group", cache_dir=tmp_path) == first
    assert (first / "rows.npy").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = ensure_group_index(dataset, "fair_group", cache_dir=tmp_path)
    assert other != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    with pytest.raises(GroupIndexError, match="'no_such_column' missing"):
        ensure_group_index(dataset, "no_such_column", cache_dir=tmp_path)


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
    args = dict(batch_size=256, num_negatives=3, seed=11, objectives=OBJECTIVES, prefetch_batches=3)
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
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        thread = threading.Thread(target=updater)
        thread.start()
        seen = set()
        try:
            for _, batch in zip(range(40), reader):
                groups = set(group_of_item[batch.item_ids[256:512, 0].numpy() - 1].tolist())
                assert groups == {batch.version % 6 + 1}, (batch.version, groups)
                seen.add(batch.version)
        finally:
            stop.set()
            thread.join()
        assert not errors
        assert len(seen) > 1  # updates really interleaved with reading


def test_concurrent_builders_publish_one_index(dataset, tmp_path):
    """Several ranks may build the same index at once: all get the same, complete index."""
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_group_index(dataset, "fair_group", cache_dir=tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # temporary builds removed
    index = GroupIndex(results[0])
    try:
        assert index.counts.sum() == dataset.split_rows("train")
    finally:
        index.close()


def test_group_values_beyond_the_manifest_count_are_refused(dataset, tmp_path):
    import copy

    manifest = copy.deepcopy(dataset.manifest)
    manifest["groups"]["fair_group"]["num_groups"] = 3
    lying = PreparedDataset(dataset.path, manifest)
    with pytest.raises(GroupIndexError, match="hold group 7, but the manifest says num_groups=3"):
        ensure_group_index(lying, "fair_group", cache_dir=tmp_path)
