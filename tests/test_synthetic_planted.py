"""The synthetic generator's planted structure (``planted_clusters``): taste clusters a model
can learn, spanning every price and popularity band, and an accuracy-only recommender that
over-recommends the popular head (room for MoRec's alignment objective to lower Pop-KL)."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest

from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.prepare.synthetic import generate, planted_structure
from morec_dist.eval.metrics import compute_metrics

USERS, ITEMS, ROWS, CLUSTERS, SEED = 600, 300, 25_000, 6, 3


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = generate(
        tmp_path_factory.mktemp("planted") / "ds",
        users=USERS,
        items=ITEMS,
        rows=ROWS,
        seed=SEED,
        planted_clusters=CLUSTERS,
    )
    return PreparedDataset.open(root), planted_structure(USERS, ITEMS, SEED, CLUSTERS)


def test_rows_follow_the_users_clusters(planted):
    ds, ps = planted
    train = ds.read_split("train", ["user_id", "item_id"])
    users, items = train["user_id"].to_numpy(), train["item_id"].to_numpy()
    share = (ps.user_cluster[users - 1] == ps.item_cluster[items - 1]).mean()
    expected = ps.in_cluster + (1 - ps.in_cluster) / CLUSTERS  # own cluster, or by chance
    assert share == pytest.approx(expected, abs=0.03)
    assert json.loads((ds.path / "manifest.json").read_text())["source"]["planted_clusters"] == CLUSTERS


def test_every_cluster_spans_every_price_and_popularity_band(planted):
    ds, ps = planted
    price_band, popularity_band = ds.item_column("rev_group")[1:], ds.item_column("align_group")[1:]
    for c in range(CLUSTERS):
        mine = ps.item_cluster == c
        assert set(price_band[mine]) == set(range(1, ds.num_groups("rev_group") + 1)), c
        # popularity bands are realised train counts: a busy cluster may lack the last tail band
        bands = set(popularity_band[mine])
        assert 1 in bands and len(bands) >= ds.num_groups("align_group") - 2, (c, bands)
    # prices independent of popularity: no strong rank correlation
    price, popularity = ds.item_column("price")[1:], ds.item_column("popularity")[1:]
    ranks = np.argsort(np.argsort(price)), np.argsort(np.argsort(popularity))
    assert abs(np.corrcoef(*ranks)[0, 1]) < 0.2


def recommend_metrics(ds: PreparedDataset, score_of) -> dict[str, float]:
    """Test-split metrics@10 of a scorer (train + valid masked), through eval/metrics.py."""
    history: dict[int, list[int]] = {}
    for split in ("train", "valid"):
        t = ds.read_split(split, ["user_id", "item_id"])
        for u, i in zip(t["user_id"].to_numpy().tolist(), t["item_id"].to_numpy().tolist(), strict=True):
            history.setdefault(u, []).append(i)
    test = ds.read_split("test", ["user_id", "item_id"])
    align, users_fair = ds.item_column("align_group"), ds.item_column("fair_group")
    ranks, prices, fair, bands = [], [], [], np.zeros(ds.num_groups("align_group"), dtype=np.int64)
    for u, target in zip(test["user_id"].to_numpy().tolist(), test["item_id"].to_numpy().tolist(), strict=True):
        score = score_of(u).astype(np.float64).copy()
        score[0] = -np.inf
        score[[i for i in history.get(u, []) if i != target]] = -np.inf
        order = np.lexsort((np.arange(len(score)), -score))
        ranks.append(int(np.flatnonzero(order == target)[0]) + 1)
        prices.append(ds.item_column("price")[target])
        fair.append(users_fair[target])
        bands += np.bincount(align[order[:10]], minlength=len(bands) + 1)[1:]
    return compute_metrics(np.array(ranks), np.array(prices), np.array(fair), {10: bands}, np.asarray(ds.q_star), [10])


def q_star_seats(ds: PreparedDataset, popularity: np.ndarray, mine: np.ndarray) -> np.ndarray:
    """Scores whose order gives band b's r-th most popular item the quotient q*_b / (r + 1)."""
    band = ds.item_column("align_group")
    q = np.asarray(ds.q_star)
    score = np.full(len(popularity), -1.0)
    for b in range(1, len(q) + 1):
        members = np.flatnonzero(mine & (band == b))
        members = members[np.argsort(-popularity[members], kind="stable")]
        score[members] = q[b - 1] / (np.arange(len(members)) + 1.0)
    return score + 10.0 * mine  # the cluster's items first


def test_structure_is_learnable_and_leaves_room_for_alignment(planted):
    ds, ps = planted
    popularity = ds.item_column("popularity").astype(np.float64)
    cluster = np.r_[-1, ps.item_cluster]
    aligned = [q_star_seats(ds, popularity, cluster == c) for c in range(CLUSTERS)]
    global_pop = recommend_metrics(ds, lambda u: popularity)
    cluster_pop = recommend_metrics(ds, lambda u: popularity + 1e9 * (cluster == ps.user_cluster[u - 1]))
    # knowing the cluster lifts Hit@10 well above global popularity: a model can learn it
    # (both are high: rows repeat items, and the held-out item is always a candidate)
    assert cluster_pop["hit@10"] > 1.3 * global_pop["hit@10"]
    # the accuracy-only recommender over-recommends the head: Pop-KL well above 0; flattening
    # toward q* (what the alignment objective's sampler pushes toward): within the cluster,
    # seats shared among the popularity bands in proportion to q* (D'Hondt), most popular first
    flatter = recommend_metrics(ds, lambda u: aligned[ps.user_cluster[u - 1]])
    assert cluster_pop["pop_kl@10"] > 0.3, cluster_pop
    assert flatter["pop_kl@10"] < 0.9 * cluster_pop["pop_kl@10"], (flatter, cluster_pop)
    assert flatter["hit@10"] > 0.9 * cluster_pop["hit@10"]


def test_planted_generation_is_deterministic(planted, tmp_path):
    ds, _ = planted
    again = generate(tmp_path / "again", users=USERS, items=ITEMS, rows=ROWS, seed=SEED, planted_clusters=CLUSTERS)
    for rel in json.loads((ds.path / "manifest.json").read_text())["files"]:
        assert filecmp.cmp(ds.path / rel, again / rel, shallow=False), rel
    with pytest.raises(ValueError, match="planted_clusters must be 1..items"):
        planted_structure(USERS, ITEMS, SEED, ITEMS + 1)
