"""``morec export`` and its index: time, memory, recall, and the exported user tower's parity.

    nice -n 15 python -m benchmarks.export             # ML-1M and a 10M-item catalogue, 2 ranks
    nice -n 15 python -m benchmarks.export --quick     # ML-1M and a 200k-item catalogue

Every stage is the product's own path, run as a user runs it, and cached under ``--cache``
(the run resumes where it stopped: a stage whose result is in ``<cache>/state.json`` is not
run again):

- ML-1M (``.data/movielens-1m``, prepared when missing): MF pretrained by ``morec train``
  (``--ml1m-epochs``), exported by ``morec export --index`` on 2 ranks with an IVF index
  (``--ml1m-nlist`` cells, ``--ml1m-nprobe`` searched), evaluated by ``morec evaluate --ann``:
  Hit@10 through the index against exact, recall@10. A two-tower pretrained the same way is
  exported (flat index) and its ``user_tower.pt2`` scores against the index's item vectors
  in a process that can import only torch and faiss; the same scores from the trained model
  (unsharded, loaded from the checkpoint with DCP) give the max abs difference.
- A synthetic catalogue of ``--items`` items, 2 ranks: the model is made by the product's
  Trainer, born sharded (``benchmarks/dist_export_model.py``: clustered vectors, 64 dims,
  saved with ``save_checkpoint``); ``morec export`` on 2 ranks (no index: the rank figures);
  the IVF index built from the export by the product's ``build_index`` in its own process;
  recall@10 of the index against the exact top-10 (a streamed brute force over the parts) for
  ``--queries`` users' vectors at each nprobe of ``--nprobes``, with its query throughput
  (one search call per nprobe, all queries, FAISS threads as configured).

Per-rank peak RSS is the VmHWM of each rank process (polled every 0.2 s while it runs), beside
its table bytes (the planner's placement): a rank's memory follows its shard, not the catalogue.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, Recorder, bench_env, bench_parser, default_out, note, peak_rss_mb, torchrun

CACHE = REPO / ".data" / "bench" / "export"
DIM = 64


# ---------------------------------------------------------------- processes


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (one /proc walk)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        nxt = [p for p, pp in parent.items() if pp in frontier]
        found += nxt
        frontier = nxt
    return found


def rank_of(pid: int) -> int | None:
    try:
        env = (Path(f"/proc/{pid}") / "environ").read_bytes().split(b"\0")
        cmd = (Path(f"/proc/{pid}") / "cmdline").read_bytes()
    except OSError:
        return None
    if b"morec_dist.cli" not in cmd:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in (Path(f"/proc/{pid}") / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_measured(args: list[str], log: Path, timeout_s: float = 7200) -> dict[str, Any]:
    """``morec <args>`` (it starts its ranks); wall seconds and each rank's peak RSS (MiB)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "morec_dist.cli", *args],
            cwd=REPO,
            env=bench_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        peaks: dict[int, float] = {}
        while proc.poll() is None:
            for pid in children(proc.pid):
                rank, hwm = rank_of(pid), vm_hwm_mb(pid)
                if rank is not None and hwm is not None:
                    peaks[rank] = max(peaks.get(rank, 0.0), hwm)
            if time.perf_counter() - started > timeout_s:
                proc.kill()
            time.sleep(0.2)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"morec {' '.join(args)} exited {proc.returncode}:\n{tail}")
    return {
        "wall_s": round(time.perf_counter() - started, 2),
        "peak_rss_mb_per_rank": [peaks[r] for r in sorted(peaks)],
    }


def morec_quiet(args: list[str], log: Path) -> float:
    return run_measured(args, log)["wall_s"]


class State:
    """Stage results kept between runs (resumable)."""

    def __init__(self, path: Path):
        self.path = path
        self.values: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def stage(self, name: str, run) -> Any:
        if name not in self.values:
            print(f"[export bench] {name} ...", flush=True)
            value = run()
            # merged with what is on disk now: the ML-1M and catalogue parts may run at once (--only)
            self.values = {**(json.loads(self.path.read_text()) if self.path.exists() else {}), name: value}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.values, indent=1, sort_keys=True))
            tmp.replace(self.path)
        print(f"[export bench] {name}: {json.dumps(self.values[name])[:400]}", flush=True)
        return self.values[name]


# --------------------------------------------------------------------- ML-1M


def train(cache: Path, data: Path, model: str, epochs: int, extra: list[str]) -> Path:
    out = cache / f"ml1m-{model}"
    overrides = [
        f'data.path="{data}"',
        f'run.out_dir="{out}"',
        f"train.epochs={epochs}",
        f'model.name="{model}"',
        "model.embedding_dim=64",
        "run.seed=0",
        "train.log_every=0",
        *extra,
    ]
    morec_quiet(
        ["train", "--config", str(REPO / "configs" / "quickstart.toml"), *overrides], cache / "logs" / f"{out.name}.log"
    )
    return out / "checkpoints" / "best"


def export(cache: Path, checkpoint: Path, out: Path, *extra: str) -> dict[str, Any]:
    if out.exists():
        import shutil

        shutil.rmtree(out)
    figures = run_measured(
        ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--nproc", "2", *extra],
        cache / "logs" / f"{out.name}.log",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        **figures,
        "items": manifest["items"]["count"],
        "index": manifest.get("index"),
        "bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "table_gib_per_rank": placement(cache / "logs" / f"{out.name}.log"),
    }


def evaluate_ann(cache: Path, export_dir: Path, data: Path) -> dict[str, Any]:
    out = cache / f"{export_dir.name}-ann.json"
    morec_quiet(
        ["evaluate", "--ann", str(export_dir), "--out", str(out), f'data.path="{data}"'],
        cache / "logs" / f"{export_dir.name}-ann.log",
    )
    report = json.loads(out.read_text())
    exact, ann = report["exact"]["hit@10"], report["ann"]["hit@10"]
    return {
        "exact_hit@10": exact,
        "ann_hit@10": ann,
        "relative_change": (ann - exact) / exact,
        "recall@10": report["recall"]["recall@10"],
        "queries_per_s": report["index_queries_per_s"],
        "change": report["change"],
        "index": report["index"],
    }


# the serving side: a process where only torch and faiss can be imported
PARITY = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("morec_dist", "torchrec", "fbgemm_gpu", "pyarrow", "benchmarks", "numba", "ray"):
            raise ImportError("refused: " + name)
sys.meta_path.insert(0, Refuse())
import json, torch, faiss
inputs = torch.load(sys.argv[1] + "/inputs.pt", weights_only=True)
tower = torch.export.load(sys.argv[2] + "/user_tower.pt2").module()
index = faiss.read_index(sys.argv[2] + "/index.faiss")
items = torch.from_numpy(index.reconstruct_n(0, index.ntotal))
scores = tower(inputs) @ items.T
torch.save(scores, sys.argv[1] + "/served.pt")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("morec_dist", "torchrec", "pyarrow"))))
"""


def tower_parity(cache: Path, checkpoint: Path, export_dir: Path, data: Path, users: int) -> dict[str, Any]:
    """Max |served - trained| over ``users`` users x every item."""
    import torch

    from morec_dist.config import config_from_dict
    from morec_dist.data.dataset import PreparedDataset
    from morec_dist.export.user_side import tower_inputs
    from morec_dist.model.init import META, materialize_unsharded
    from morec_dist.model.registry import build_model
    from morec_dist.model.spec import as_recommender
    from morec_dist.train.checkpoint import dcp_load, read_meta
    from morec_dist.train.trainer import build_features

    config = config_from_dict(read_meta(checkpoint)["config"])
    dataset = PreparedDataset.open(data, verify_checksums=False, verify_values=False)
    features = build_features(config, dataset)
    model = build_model(config.model.name, features, config.model, device=META)
    model = materialize_unsharded(model, config.run.seed, config.model.init_std, torch.device("cpu")).eval()
    dcp_load({"model": model.state_dict()}, checkpoint)
    ids = np.sort(np.random.default_rng(0).choice(dataset.num_users, users, replace=False) + 1)
    with torch.no_grad():
        vectors = as_recommender(model)  # the trained model's scores: its spec's vectors
        trained = (
            vectors.user_vectors(features.user_kjt(ids))
            @ vectors.item_vectors(features.item_kjt(np.arange(1, dataset.num_items + 1))).T
        )
    work = cache / "parity"
    work.mkdir(exist_ok=True)
    torch.save(tower_inputs(features.user_kjt(ids)), work / "inputs.pt")
    env = {k: v for k, v in bench_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", PARITY, str(work), str(export_dir)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the torch + faiss process failed:\n{proc.stderr[-3000:]}")
    served = torch.load(work / "served.pt", weights_only=True)
    return {
        "users": users,
        "items": dataset.num_items,
        "max_abs_diff": float((served - trained).abs().max().detach()),
        "max_abs_score": float(trained.abs().max()),
        "imported_package_modules": json.loads(proc.stdout),
    }


# ----------------------------------------------------------- the big catalogue


def big_model(cache: Path, items: int, users: int, given: Path | None) -> Path:
    data = given or cache / f"syn-{items}"
    if not (data / "manifest.json").exists():
        morec_quiet(
            [
                "prepare",
                "synthetic",
                "--users",
                str(users),
                "--items",
                str(items),
                "--rows",
                str(20 * users),
                "--seed",
                "0",
                "--out",
                str(data),
                "--overwrite",
            ],
            cache / "logs" / f"{data.name}.log",
        )
    checkpoint = cache / f"ckpt-{items}"
    if not (checkpoint / "meta.json").exists():
        torchrun(
            "benchmarks.dist_export_model",
            [
                "--out",
                str(checkpoint),
                f'data.path="{data}"',
                f"model.embedding_dim={DIM}",
                "run.seed=0",
                'model.default_sharding="row_wise"',
            ],
            log=cache / "logs" / f"model-{items}.log",
            env=bench_env(),
        )
    return checkpoint


def index_phase(export_dir: Path, out: Path, nlist: int, nprobe: int) -> None:
    """In its own process (``--phase index``): the product's build_index from the export."""
    from morec_dist.export.index import IndexOptions, build_index

    manifest = json.loads((export_dir / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    record = build_index(export_dir, manifest, IndexOptions("ivf", 0, nlist, nprobe), seed=0, out=out)
    (out / "build.json").write_text(
        json.dumps({"record": record, "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()})
    )


def exact_top(export_dir: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k item ids per query (ties: lower id), streamed over the item parts."""
    from morec_dist.export.index import item_batches

    manifest = json.loads((export_dir / "manifest.json").read_text())
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), k), dtype=np.int64)
    for start, vectors in item_batches(export_dir, manifest["items"]["parts"]):
        scores = queries @ vectors.T
        cand_s = np.concatenate([best_s, scores], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(vectors)), scores.shape)], axis=1)
        keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    return best_i


def recall_phase(export_dir: Path, index_dir: Path, out: Path, queries: int, nprobes: list[int]) -> None:
    """In its own process (``--phase recall``): recall@10 and queries/s per nprobe."""
    import faiss
    import pyarrow.parquet as pq

    manifest = json.loads((export_dir / "manifest.json").read_text())
    users = pq.read_table(export_dir / "users" / manifest["user_side"]["parts"][0], columns=["vector"])
    rows = np.random.default_rng(1).choice(users.num_rows, queries, replace=False)
    q = users["vector"].combine_chunks().values.to_numpy().reshape(users.num_rows, -1)[np.sort(rows)].copy()
    t = time.perf_counter()
    truth = exact_top(export_dir, q, 10)
    exact_s = time.perf_counter() - t
    index: Any = faiss.read_index(str(index_dir / "index.faiss"))
    points = []
    for nprobe in nprobes:
        index.nprobe = nprobe
        t = time.perf_counter()
        _, found = index.search(q, 10)
        seconds = time.perf_counter() - t
        hits = [len(set(a.tolist()) & set((b - 1).tolist())) / 10 for a, b in zip(found, truth, strict=True)]
        points.append({"nprobe": nprobe, "recall@10": float(np.mean(hits)), "queries_per_s": queries / seconds})
    out.write_text(
        json.dumps(
            {
                "queries": queries,
                "exact_scan_s": exact_s,
                "faiss_threads": faiss.omp_get_max_threads(),
                "points": points,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


def own_phase(args: list[str], log: Path) -> dict[str, Any]:
    """``python -m benchmarks.export --phase ...`` in a fresh process; its JSON result file."""
    started = time.perf_counter()
    torchless = [sys.executable, "-m", "benchmarks.export", *args]
    with open(log, "w") as sink:
        subprocess.run(torchless, cwd=REPO, env=bench_env(), stdout=sink, stderr=subprocess.STDOUT, check=True)
    return {"wall_s": time.perf_counter() - started}


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = bench_parser(__doc__)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--items", type=int, default=None, help="synthetic catalogue (default 10M; quick 200k)")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--nprobes", type=int, nargs="*", default=[8, 16, 32, 64, 128])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--ml1m", type=Path, default=REPO / ".data" / "movielens-1m")
    parser.add_argument("--ml1m-epochs", type=int, default=3)
    parser.add_argument("--ml1m-nlist", type=int, default=64)
    parser.add_argument("--ml1m-nprobe", type=int, default=8)
    parser.add_argument("--parity-users", type=int, default=256)
    parser.add_argument("--only", choices=("ml1m", "big"), default=None, help="run one part's stages (resumable)")
    parser.add_argument("--big-data", type=Path, default=None, help="the catalogue's prepared dataset, if made")
    parser.add_argument("--phase", choices=("index", "recall"), default=None, help=argparse_hidden())
    parser.add_argument("--export-dir", type=Path, default=None, help=argparse_hidden())
    parser.add_argument("--index-dir", type=Path, default=None, help=argparse_hidden())
    args = parser.parse_args(argv)
    if args.phase == "index":
        index_phase(args.export_dir, args.index_dir, args.nlist, args.nprobes[0])
        return None
    if args.phase == "recall":
        recall_phase(args.export_dir, args.index_dir, args.index_dir / "recall.json", args.queries, args.nprobes)
        return None
    items = args.items or (200_000 if args.quick else 10_000_000)
    cache = args.cache / ("quick" if args.quick else "full")
    out = args.out or default_out("export", args.quick)
    recorder = Recorder(
        "export",
        mode="quick" if args.quick else "full",
        seed=0,
        note_text=note(args.note),
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    )
    state = State(cache / "state.json")
    if not (args.ml1m / "manifest.json").exists():
        morec_quiet(["prepare", "movielens-1m", "--out", str(args.ml1m)], cache / "logs" / "prepare-ml1m.log")
    data = args.ml1m
    if args.only != "big":
        ml1m = ml1m_stages(state, cache, data, args)
    if args.only == "ml1m":
        return None
    big = big_stages(state, cache, items, args)
    if args.only == "big":
        return None
    recorder.update({"ml1m": ml1m, "catalogue": big})
    return recorder.write(out)


def ml1m_stages(state: State, cache: Path, data: Path, args: Any) -> dict[str, Any]:
    mf = state.stage("ml1m_mf_train", lambda: str(train(cache, data, "mf", args.ml1m_epochs, [])))
    ml1m_export = state.stage(
        "ml1m_mf_export",
        lambda: export(
            cache,
            Path(mf),
            cache / "ml1m-mf-export",
            "--index",
            "--index-kind",
            "ivf",
            "--nlist",
            str(args.ml1m_nlist),
            "--nprobe",
            str(args.ml1m_nprobe),
        ),
    )
    ml1m_ann = state.stage("ml1m_mf_ann", lambda: evaluate_ann(cache, cache / "ml1m-mf-export", data))
    tt = state.stage("ml1m_tt_train", lambda: str(train(cache, data, "two_tower", args.ml1m_epochs, [])))
    tt_export = state.stage("ml1m_tt_export", lambda: export(cache, Path(tt), cache / "ml1m-tt-export", "--index"))
    parity = state.stage(
        "ml1m_tt_parity", lambda: tower_parity(cache, Path(tt), cache / "ml1m-tt-export", data, args.parity_users)
    )
    return {
        "export": ml1m_export,
        "ann": ml1m_ann,
        "two_tower_export": tt_export,
        "tower_parity": parity,
        "hit_within_1pct": abs(ml1m_ann["relative_change"]) <= 0.01,
    }


def big_stages(state: State, cache: Path, items: int, args: Any) -> dict[str, Any]:
    checkpoint = state.stage("big_model", lambda: str(big_model(cache, items, args.users, args.big_data)))
    big_dir = cache / f"export-{items}"
    big_export = state.stage("big_export", lambda: export(cache, Path(checkpoint), big_dir))
    index_dir = cache / f"index-{items}"
    index_args = ["--export-dir", str(big_dir), "--index-dir", str(index_dir), "--nlist", str(args.nlist)]
    build = state.stage(
        "big_index",
        lambda: {
            **own_phase(["--phase", "index", *index_args, "--nprobes", "64"], cache / "logs" / "big-index.log"),
            **json.loads((index_dir / "build.json").read_text()),
        },
    )
    recall = state.stage(
        "big_recall",
        lambda: {
            **own_phase(
                [
                    "--phase",
                    "recall",
                    *index_args,
                    "--queries",
                    str(args.queries),
                    "--nprobes",
                    *map(str, args.nprobes),
                ],
                cache / "logs" / "big-recall.log",
            ),
            **json.loads((index_dir / "recall.json").read_text()),
        },
    )
    first = next((p for p in recall["points"] if p["recall@10"] >= 0.95), None)
    return {"items": items, "dim": DIM, "export": big_export, "index": build, "recall": recall, "recall_0_95_at": first}


def placement(log: Path) -> list[float]:
    """GiB of tables per rank, summed over the placement lines the ranks print
    (``t_item_id: table_row_wise / fused, per rank 0.600 0.600 GiB``)."""
    totals: list[float] = []
    for line in log.read_text(errors="replace").splitlines():
        match = re.search(r"^\s+t_\w+: .* per rank ([\d. ]+) GiB", line)
        if match:
            values = [float(v) for v in match.group(1).split()]
            totals = [a + b for a, b in zip(totals, values, strict=True)] if totals else values
    return totals


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
