"""The evaluation protocol: the distributed evaluator (in process and on 2 torchrun ranks
over a sharded model) against a brute-force, single-process re-implementation of DATA.md
written here independently (Python sorting, sets, loops)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.features import FeatureBuilder
from morec_dist.data.prepare.synthetic import generate
from morec_dist.distributed import DistContext
from morec_dist.eval import EvalOptions, evaluate, evaluate_most_popular

SCRIPTS = Path(__file__).parent / "dist_scripts"
sys.path.insert(0, str(SCRIPTS))
from integer_model import integer_mf  # noqa: E402 - found on the sys.path entry just above

from tests.dist_scripts.distributed_eval import topk_lists  # noqa: E402 - the worker's own helper

REPO = Path(__file__).resolve().parents[1]
KS = [1, 3, 10]
ONE = DistContext.single()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("eval") / "syn", users=50, items=80, rows=1500, seed=11)


# ------------------------------------------------------------------ brute force


def read_rows(root: Path, split: str) -> list[tuple[int, int]]:
    rows = []
    for path in sorted((root / split).glob("*.parquet")):
        t = pq.read_table(path, columns=["user_id", "item_id"])
        rows += list(zip(t["user_id"].to_pylist(), t["item_id"].to_pylist(), strict=True))
    return rows


def brute_force(root: Path, split: str, score_of, ks: list[int]) -> dict:
    """DATA.md's protocol, one user at a time; ties ordered by item id."""
    manifest = json.loads((root / "manifest.json").read_text())
    items = pq.read_table(root / "items.parquet").to_pylist()
    price = {r["item_id"]: r["price"] for r in items}
    fair = {r["item_id"]: r["fair_group"] for r in items}
    band = {r["item_id"]: r["align_group"] for r in items}
    q_star = manifest["q_star"]
    num_items = manifest["num_items"]
    history = defaultdict(set)
    for s in ["train"] + (["valid"] if split == "test" else []):
        for u, i in read_rows(root, s):
            history[u].add(i)
    heldout = dict(read_rows(root, split))
    users = sorted(heldout)
    ranks, tops, counts = [], [], {k: [0] * len(q_star) for k in ks}
    for u in users:
        target, scores = heldout[u], score_of(u)
        candidates = [i for i in range(1, num_items + 1) if i not in history[u] or i == target]
        order = sorted(candidates, key=lambda i: (-scores[i], i))
        ranks.append(order.index(target) + 1)
        tops.append(order[: max(ks)])
        for k in ks:
            for i in order[:k]:
                counts[k][band[i] - 1] += 1
    metrics = {"num_users": float(len(users))}
    for k in ks:
        hit = [1.0 if r <= k else 0.0 for r in ranks]
        ndcg = [1.0 / math.log2(r + 1) if r <= k else 0.0 for r in ranks]
        prices = [price[heldout[u]] for u in users]
        metrics[f"hit@{k}"] = sum(hit) / len(users)
        metrics[f"ndcg@{k}"] = sum(ndcg) / len(users)
        metrics[f"r_hit@{k}"] = sum(h * p for h, p in zip(hit, prices, strict=True)) / len(users)
        metrics[f"r_ndcg@{k}"] = sum(n * p for n, p in zip(ndcg, prices, strict=True)) / len(users)
        for name, values in (("hit", hit), ("ndcg", ndcg)):
            by_group = defaultdict(list)
            for u, v in zip(users, values, strict=True):
                by_group[fair[heldout[u]]].append(v)
            metrics[f"min_{name}@{k}"] = min(sum(v) / len(v) for v in by_group.values())
        smoothed = [c + 1e-10 for c in counts[k]]
        q_rec = [c / sum(smoothed) for c in smoothed]
        metrics[f"pop_kl@{k}"] = sum(q * math.log(q / r) for q, r in zip(q_star, q_rec, strict=True) if q > 0)
    return {"metrics": metrics, "ranks": ranks, "users": users, "counts": counts, "tops": tops}


def mf_scores(model) -> Callable[[int], np.ndarray]:
    weights = model.state_dict()
    user_table = weights["user_ebc.embedding_bags.t_user_id.weight"].double().numpy()
    item_table = weights["item_ebc.embedding_bags.t_item_id.weight"].double().numpy()
    return lambda u: item_table @ user_table[u]


def popularity_scores(root: Path) -> Callable[[int], np.ndarray]:
    items = pq.read_table(root / "items.parquet").to_pylist()
    pop = np.zeros(len(items) + 1)
    for r in items:
        pop[r["item_id"]] = r["popularity"]
    return lambda u: pop


def assert_matches(actual: dict, expected: dict, what: str) -> None:
    """Ranks and histograms exactly; the float metrics to the last few ulps (the brute
    force sums in a different order)."""
    assert actual["user_ids"] == expected["users"], what
    assert actual["ranks"] == expected["ranks"], what
    for k in KS:
        assert actual["band_counts"][str(k)] == expected["counts"][k], f"{what} top-{k} band counts"
    assert set(actual["metrics"]) == set(expected["metrics"]), what
    for key, value in expected["metrics"].items():
        assert actual["metrics"][key] == pytest.approx(value, rel=1e-12, abs=1e-15), f"{what} {key}"


def as_json(result) -> dict:
    return {
        "metrics": result.metrics,
        "band_counts": {str(k): v.tolist() for k, v in result.band_counts.items()},
        "user_ids": result.user_ids.tolist(),
        "ranks": result.ranks.tolist(),
    }


# ------------------------------------------------------------------------ tests


def in_process(data_dir: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    data = PreparedDataset.open(data_dir)
    features = FeatureBuilder(data.path, data.num_users, data.num_items, "ids")
    model = integer_mf(features)
    options = EvalOptions(batch_users=7)
    out: dict[str, Any] = {}
    for split in ("valid", "test"):
        out[f"mf_{split}"] = as_json(evaluate(model, data, split, KS, features, ONE, options))
        out[f"popular_{split}"] = as_json(evaluate_most_popular(data, split, KS, ONE, options))
    out["mf_test_top"] = topk_lists(model, data, "test", max(KS), features, ONE, options)
    out["zero_test"] = as_json(evaluate(zeroed(model), data, "test", KS, features, ONE, options))
    return out, model


def zeroed(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with every weight 0: every score ties, the tie rule decides alone."""
    zero = copy.deepcopy(model)
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    return zero


def test_single_process_matches_brute_force(data_dir):
    results, model = in_process(data_dir)
    ties = 0
    for split in ("valid", "test"):
        expected = brute_force(data_dir, split, mf_scores(model), KS)
        assert_matches(results[f"mf_{split}"], expected, f"mf {split}")
        assert_matches(
            results[f"popular_{split}"],
            brute_force(data_dir, split, popularity_scores(data_dir), KS),
            f"popular {split}",
        )
        scores = mf_scores(model)
        ties += sum(len(s) - len(set(s.tolist())) for s in (scores(u) for u in expected["users"]))
    # integer weights: the tie rule really decided ranks (otherwise this test proves less)
    assert ties > 0
    expected = brute_force(data_dir, "test", mf_scores(model), KS)
    assert results["mf_test_top"] == expected["tops"]
    zero = brute_force(data_dir, "test", mf_scores(zeroed(model)), KS)
    assert_matches(results["zero_test"], zero, "all-zero mf test")
    assert len(set(zero["ranks"])) > 1  # not everyone first: ties go by item id
    # the model is not trivially perfect or hopeless on this data
    assert 0 < results["mf_test"]["metrics"]["hit@10"] < 1


@pytest.mark.slow
def test_two_ranks_sharded_match_brute_force_and_one_rank(data_dir, tmp_path):
    out = tmp_path / "eval.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(SCRIPTS / "distributed_eval.py"), str(data_dir), str(out), "row_wise", "5",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    distributed = json.loads(out.read_text())
    assert distributed["world_size"] == 2
    single, model = in_process(data_dir)
    for key in ("mf_valid", "mf_test", "popular_valid", "popular_test", "mf_test_top", "zero_test"):
        # identical, bit for bit, to one rank (different batch size and no sharding too)
        assert distributed[key] == single[key], key
    expected = brute_force(data_dir, "test", mf_scores(model), KS)
    assert_matches(distributed["mf_test"], expected, "mf test (2 ranks)")
    assert distributed["mf_test_top"] == expected["tops"]
    # the two item ranges both contribute to the merged lists (the merge is exercised)
    lo_items = sum(i <= data_dir_items(data_dir) // 2 for top in expected["tops"] for i in top)
    assert 0 < lo_items < sum(len(top) for top in expected["tops"])


def data_dir_items(root: Path) -> int:
    return int(json.loads((root / "manifest.json").read_text())["num_items"])


def test_rejects_bad_arguments(data_dir):
    with pytest.raises(ValueError, match="split 'train'"):
        evaluate_most_popular(data_dir, "train", [10])
    with pytest.raises(ValueError, match="eval.ks"):
        evaluate_most_popular(data_dir, "test", [0])
