"""``morec evaluate --ann DIR``: the evaluation protocol (docs/data.md) through an export's
FAISS index, beside the exact protocol over the same exported vectors, in one process. DIR
may be a filesystem URI: the export is downloaded to a temporary directory first (every
file checked against its manifest's sha256), and the report goes beside it on the store.

Exact: the evaluator's own ranking (eval/ranking.py ``ranked_batches``: held-out rank,
top-K under (score desc, item id asc), history masked) with the exported user vectors
against all exported item vectors. Through the index: per user, the index's top
``K + H`` items (H: the longest history of any evaluated user, so that masking the user's
history, exactly the items the exact ranking masks, still leaves K candidates when the
index is exact), history removed (the held-out item stays a candidate, as in the exact
protocol), ordered by (score desc, item id asc), the first K kept; the held-out item's rank
is its position there, or beyond K. The same metrics (eval/metrics.py) come from both; the
report adds recall@K of the index's top-K against the exact top-K and the metric change.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from morec_dist.config import Config
from morec_dist.data.dataset import PreparedDataset
from morec_dist.data.storage import Location, StoragePath
from morec_dist.distributed import DistContext
from morec_dist.eval.evaluator import ItemMeta, load_users
from morec_dist.eval.metrics import compute_metrics
from morec_dist.eval.ranking import PAD_ID, EvalOptions, UserSet, band_counts, ranked_batches
from morec_dist.export.index import item_batches, load_index
from morec_dist.export.layout import INDEX_FILE, ITEMS_DIR, ExportError, read_manifest, verify_files
from morec_dist.export.store import local_copy
from morec_dist.export.user_side import user_side_of
from morec_dist.train.run_dir import provenance, run_path, write_json_atomic
from morec_dist.train.trainer import build_features

ANN_BATCH = 4096  # users per index search


def export_config(root: str | Path, given: Config | None) -> Config:
    """The config recorded in the export; data / eval / run sections may be replaced."""
    from morec_dist.config import config_from_dict

    recorded = dict(read_manifest(root)["config"])
    if given is not None:
        fresh = given.to_dict()
        for section in ("data", "eval", "run"):
            recorded[section] = fresh[section]
    return config_from_dict(recorded)


def open_export(root: Path, dataset: PreparedDataset, shown: str | None = None) -> dict[str, Any]:
    """The manifest, checked against the dataset, with every file evaluation reads verified;
    ``shown`` names the export in messages (its URI when ``root`` is a local copy)."""
    manifest = read_manifest(root)
    shown = shown or str(root)
    if manifest.get("index") is None:
        raise ExportError(f"--ann {shown}: the export has no index (export it with --index)")
    for key, count in (("num_items", dataset.num_items), ("num_users", dataset.num_users)):
        if manifest["dataset"][key] != count:
            raise ExportError(
                f"--ann {shown}: exported for {manifest['dataset'][key]} {key[4:]}, "
                f"data.path {dataset.path} has {count}"
            )
    side = user_side_of(manifest["model"]["name"])
    parts = [f"{ITEMS_DIR}/{n}" for n in manifest["items"]["parts"]]
    verify_files(root, manifest, [INDEX_FILE, *parts, *side.files(manifest)])
    return manifest


def all_item_vectors(root: Path, manifest: dict[str, Any]) -> torch.Tensor:
    """[N + 1, d] float32, row 0 (padding) zero: the exact scorer's item matrix."""
    n, d = manifest["items"]["count"], manifest["dims"]["output"]
    out = torch.zeros(n + 1, d, dtype=torch.float32)
    for start, vectors in item_batches(root, manifest["items"]["parts"]):
        out[start : start + vectors.shape[0]] = torch.from_numpy(vectors)
    return out


def exact_pass(users: UserSet, user_vectors: np.ndarray, items: torch.Tensor, k: int, batch: int):
    """(ranks [U], top [U, k]) of the exact protocol over the exported vectors."""
    items_t = items.t()
    position = {int(u): i for i, u in enumerate(users.user_ids)}
    vectors = torch.from_numpy(user_vectors)

    def score(ids: np.ndarray) -> torch.Tensor:
        return vectors[[position[int(u)] for u in ids]] @ items_t

    ranks = np.zeros(len(users), dtype=np.int64)
    top = np.zeros((len(users), k), dtype=np.int64)
    ctx = DistContext.single()
    for b in ranked_batches(score, users, items.shape[0] - 1, k, ctx, EvalOptions(batch_users=batch)):
        ranks[b.start : b.stop] = b.ranks.numpy()
        top[b.start : b.stop] = b.top_items.numpy()
    return ranks, top


def filtered_topk(
    users: UserSet, start: int, ids: np.ndarray, scores: np.ndarray, k: int, num_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """The index's candidates of users [start, start + B) minus their history (not the
    held-out item), in ranking order: (top [B, k] with PAD_ID past the candidates, ranks [B])."""
    rows, width = ids.shape
    row = np.repeat(np.arange(rows), width)
    item = ids.reshape(-1) + 1  # FAISS position p is item p + 1; -1 (no result) becomes 0
    score = scores.reshape(-1).astype(np.float64)
    span = np.int64(num_items + 1)  # (row, item) pairs as one key
    lo, hi = users.history_indptr[start], users.history_indptr[start + rows]
    hist_rows = np.repeat(np.arange(rows), np.diff(users.history_indptr[start : start + rows + 1]))
    hist_keys = hist_rows * span + users.history_items[lo:hi]
    targets = users.targets[start : start + rows]
    keys = row * span + item
    drop = (item == 0) | (np.isin(keys, hist_keys) & (item != targets[row]))
    row, item, score = row[~drop], item[~drop], score[~drop]
    order = np.lexsort((item, -score, row))  # by row, score desc, item asc
    row, item = row[order], item[order]
    first = np.searchsorted(row, np.arange(rows))
    slot = np.arange(row.size) - first[row]
    keep = slot < k
    top = np.full((rows, k), PAD_ID, dtype=np.int64)
    top[row[keep], slot[keep]] = item[keep]
    hit = top == targets[:, None]
    ranks = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, k + 1)
    return top, ranks


def ann_pass(users: UserSet, user_vectors: np.ndarray, index: Any, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(ranks, top, seconds spent in the index) through the index."""
    longest = int(np.diff(users.history_indptr).max(initial=0))
    width = min(k + longest, int(index.ntotal))
    ranks = np.zeros(len(users), dtype=np.int64)
    top = np.zeros((len(users), k), dtype=np.int64)
    searching = 0.0
    for start in range(0, len(users), ANN_BATCH):
        stop = min(start + ANN_BATCH, len(users))
        t = time.perf_counter()
        scores, ids = index.search(np.ascontiguousarray(user_vectors[start:stop]), width)
        searching += time.perf_counter() - t
        top[start:stop], ranks[start:stop] = filtered_topk(users, start, ids, scores, k, int(index.ntotal))
    return ranks, top, searching


def recall(ann_top: np.ndarray, exact_top: np.ndarray, k: int) -> float:
    """Mean over users of |index top-k ∩ exact top-k| / |exact top-k|."""
    shares = []
    for a, e in zip(ann_top[:, :k], exact_top[:, :k], strict=True):
        truth = set(e[e != PAD_ID].tolist())
        if truth:
            shares.append(len(truth & set(a.tolist())) / len(truth))
    return float(np.mean(shares)) if shares else float("nan")


def metrics_of(ranks: np.ndarray, top: np.ndarray, users: UserSet, meta: ItemMeta, ks: list[int]) -> dict[str, float]:
    """The protocol's metrics (eval/metrics.py) from ranks and top-K lists."""
    bands = torch.from_numpy(meta.align_group)
    counts = {k: band_counts(torch.from_numpy(top), k, bands, meta.num_align_groups).numpy() for k in ks}
    targets = users.targets
    return compute_metrics(ranks, meta.price[targets], meta.fair_group[targets], counts, meta.q_star, ks)


def evaluate_ann(
    config: Config, root: str | Path, split: str = "test", out: str | Path | None = None, nprobe: int | None = None
) -> dict[str, Any]:
    """Through the export at ``root``, a directory or a URI (downloaded to a temporary
    directory first, every file checked against the manifest: export/store.py)."""
    with local_copy(root) as local:
        return evaluate_local(config, local, str(root), split, out or default_out(root, split), nprobe)


def default_out(root: str | Path, split: str) -> StoragePath:
    """Beside the export: ``metrics-<split>-ann.json`` in its parent directory (or prefix)."""
    return run_path(root).parent / f"metrics-{split}-ann.json"


def evaluate_local(
    config: Config, root: Path, shown: str, split: str, out: str | Path | Location, nprobe: int | None
) -> dict[str, Any]:
    """``evaluate_ann`` on a local export directory; ``shown`` names the export in the report."""
    dataset = PreparedDataset.open(config.data.path, verify_checksums=False, verify_values=False)
    manifest = open_export(root, dataset, shown)
    ks = sorted({int(k) for k in config.eval.ks})
    k = ks[-1]
    users = load_users(dataset, split, DistContext.single())
    features = build_features(config, dataset)
    read = user_side_of(manifest["model"]["name"]).vectors
    if read is None:
        raise ExportError(f"--ann {shown}: the user side of model {manifest['model']['name']!r} is not readable here")
    user_vectors = read(root, manifest, users.user_ids, features)
    meta = ItemMeta.from_dataset(dataset)
    exact_ranks, exact_top = exact_pass(
        users, user_vectors, all_item_vectors(root, manifest), k, config.eval.batch_users
    )
    index = load_index(root, manifest["index"], nprobe)
    ann_ranks, ann_top, seconds = ann_pass(users, user_vectors, index, k)
    exact = metrics_of(exact_ranks, exact_top, users, meta, ks)
    ann = metrics_of(ann_ranks, ann_top, users, meta, ks)
    payload = {
        "split": split,
        "job": "evaluate_ann",
        "export": shown,
        "index": {**manifest["index"], **({"nprobe": nprobe} if nprobe is not None else {})},
        "exact": exact,
        "ann": ann,
        "change": {m: ann[m] - exact[m] for m in exact if "@" in m},
        "recall": {f"recall@{kk}": recall(ann_top, exact_top, kk) for kk in ks},
        "index_queries_per_s": len(users) / max(seconds, 1e-9),
        "candidates_per_query": min(k + int(np.diff(users.history_indptr).max(initial=0)), int(index.ntotal)),
        **provenance(config, 1),
    }
    path = write_json_atomic(out, payload)
    print(" ".join(f"{m} {v:.4f}" for m, v in ann.items() if "@" in m), flush=True)
    changes = " ".join(f"{m} {v:+.4f}" for m, v in payload["change"].items() if m.startswith(("hit", "ndcg")))
    print(" ".join(f"{m} {v:.4f}" for m, v in payload["recall"].items()) + f" change vs exact: {changes}", flush=True)
    print(f"wrote {path}", flush=True)
    return payload
