"""The FAISS index over an export's item vectors (``morec export --index``), inner product.

Which index (``IndexOptions``, from ``morec export``'s flags, recorded in the manifest):
``flat`` (IndexFlatIP: exact) up to ``flat_max_items`` items, ``ivf`` (IndexIVFFlat: k-means
cells, ``nlist`` of them, ``nprobe`` searched) beyond, unless ``kind`` names one. The index
holds items 1..N at FAISS positions 0..N-1 (item id = position + 1). The k-means training
sample and FAISS's own clustering seed come from the run's seed.

Built from the Parquet parts, streamed one row group at a time (the index is the only copy
of the catalogue in memory). One process builds it (FAISS has no sharded build here).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from morec_dist.export.layout import INDEX_FILE, INDEX_META, ITEMS_DIR, ExportError

INDEX_KINDS = ("auto", "flat", "ivf")
TRAIN_POINTS_PER_CELL = 64  # k-means training sample: nlist * this many items (FAISS wants >= 39)


@dataclass(frozen=True)
class IndexOptions:
    kind: str = "auto"
    flat_max_items: int = 1_000_000  # auto: an exact flat index up to this many items, IVF beyond
    nlist: int = 0  # IVF cells; 0 = 4 * sqrt(items), at least 1
    nprobe: int = 64  # IVF cells searched per query (a search-time default, stored in the index)

    def check(self) -> IndexOptions:
        if self.kind not in INDEX_KINDS:
            raise ExportError(f"--index-kind: expected one of {INDEX_KINDS}, got {self.kind!r}")
        for flag, value, least in (("--flat-max-items", self.flat_max_items, 0), ("--nlist", self.nlist, 0),
                                   ("--nprobe", self.nprobe, 1)):  # fmt: skip
            if value < least:
                raise ExportError(f"{flag}: expected >= {least}, got {value}")
        return self

    def resolved(self, items: int) -> tuple[str, int]:
        """(kind, nlist) for a catalogue of ``items``."""
        kind = self.kind if self.kind != "auto" else ("flat" if items <= self.flat_max_items else "ivf")
        nlist = self.nlist or max(1, int(4 * math.sqrt(items)))
        return kind, min(nlist, items)


def item_batches(root: Path, parts: list[str]):
    """(first item id, vectors [n, d] float32) per row group, in id order."""
    for name in parts:
        file = pq.ParquetFile(root / ITEMS_DIR / name)
        for g in range(file.num_row_groups):
            table = file.read_row_group(g, columns=["item_id", "vector"])
            vectors = table["vector"].combine_chunks().values.to_numpy().reshape(table.num_rows, -1)
            yield int(table["item_id"][0].as_py()), np.array(vectors, dtype=np.float32)  # writable, C order


def training_sample(root: Path, parts: list[str], items: int, size: int, seed: int) -> np.ndarray:
    """A seeded sample of ``size`` item vectors (all when fewer), gathered in one pass."""
    rng = np.random.default_rng([seed, 7919])
    wanted = np.sort(rng.choice(items, size=min(size, items), replace=False)) + 1
    out = []
    for start, vectors in item_batches(root, parts):
        stop = start + vectors.shape[0]
        take = wanted[(wanted >= start) & (wanted < stop)] - start
        out.append(vectors[take])
    return np.concatenate(out)


def build_index(
    root: Path, manifest: dict[str, Any], options: IndexOptions, seed: int, out: Path | None = None
) -> dict[str, Any]:
    """Writes ``index.faiss`` and ``index.json`` into ``out`` (default ``root``, the export's
    staging directory with its item parts); returns the record for the manifest."""
    out = out or root
    import faiss

    items, dim = int(manifest["items"]["count"]), int(manifest["dims"]["output"])
    parts = manifest["items"]["parts"]
    kind, nlist = options.check().resolved(items)
    index: Any
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed  # FAISS's k-means initialisation
        index.train(training_sample(root, parts, items, nlist * TRAIN_POINTS_PER_CELL, seed))
        index.nprobe = min(options.nprobe, nlist)
    expected = 1
    for start, vectors in item_batches(root, parts):
        if start != expected:
            raise ExportError(f"{root / ITEMS_DIR}: item {expected} expected next, found {start}")
        index.add(vectors)
        expected += vectors.shape[0]
    record = {**asdict(options), "kind": kind, "nlist": nlist if kind == "ivf" else 0, "metric": "inner_product",
              "faiss_class": type(index).__name__, "ntotal": int(index.ntotal), "file": INDEX_FILE,
              "positions": "FAISS position p holds item_id p + 1", "seed": seed}  # fmt: skip
    if kind == "ivf":
        record["nprobe"] = int(index.nprobe)
    faiss.write_index(index, str(out / INDEX_FILE))
    (out / INDEX_META).write_text(json.dumps(record, indent=1, sort_keys=True))
    return record


def load_index(root: Path, record: dict[str, Any], nprobe: int | None = None) -> Any:
    import faiss

    index: Any = faiss.read_index(str(root / record["file"]))
    if nprobe is not None and record["kind"] == "ivf":
        index.nprobe = nprobe
    return index
