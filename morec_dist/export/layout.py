"""The on-disk contract of an export directory: file names, the vector tables' schema, how
entities are cut into part files, the staging directory and its atomic publication, and
the manifest (checksums of every file, written last). An export at a URI has the same
layout below its prefix (published by export/store.py, the manifest uploaded last).

Layout::

    manifest.json                   model, dims, the run's config, versions, seed, sha256 of every file
    items/part-<nnnnn>.parquet      item_id (dense), raw_id (when the dataset has an id map), vector
    users/part-<nnnnn>.parquet      MF: user_id, raw_id, vector
    user_tower.pt2                  two-tower: the user tower (``torch.export``; loads with torch alone)
    user_tower.json                 two-tower: its inputs (names, dtypes, vocab sizes) and output dim
    index.faiss, index.json         with ``--index``: the FAISS index over items/ and its parameters

Part ``k`` holds the entities ``1 + k * part_rows`` .. ``(k + 1) * part_rows`` (0, the padding
id, is never exported) whatever the number of ranks; rank r writes parts r, r + W, ...
So 1 and N ranks write byte-identical parts, and a rank holds one chunk of vectors at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from morec_dist.data import storage
from morec_dist.data.schema import part_name, sha256_file
from morec_dist.data.storage import Location, StoragePath
from morec_dist.train.run_dir import write_json_atomic

MANIFEST = "manifest.json"
ITEMS_DIR = "items"
USERS_DIR = "users"
TOWER_FILE = "user_tower.pt2"
TOWER_SPEC = "user_tower.json"
INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
EXPORT_FORMAT = 1
# Entities per part file: big enough that a 10M catalogue is ten files, small enough that
# parts spread over the ranks of any job.
DEFAULT_PART_ROWS = 1 << 20
# Entities looked up at once: one chunk of vectors is all a rank holds in flight.
LOOKUP_ROWS = 1 << 16
# the parent `morec export` names the staging directory, so it can remove it if the ranks fail
STAGING_ENV = "MOREC_EXPORT_STAGING"


class ExportError(ValueError):
    """Bad input to an export or to evaluation through one (exit 2, one line)."""


# ------------------------------------------------------------------ parts


@dataclass(frozen=True)
class Part:
    index: int
    start: int  # first entity id
    stop: int  # one past the last

    @property
    def name(self) -> str:
        return part_name(self.index)

    def chunks(self, rows: int) -> Iterator[tuple[int, int]]:
        """[a, b) id windows of at most ``rows`` ids, aligned to the part's start (so the
        same windows, hence the same row groups, on every world size)."""
        for a in range(self.start, self.stop, rows):
            yield a, min(a + rows, self.stop)


def parts(count: int, part_rows: int) -> list[Part]:
    """Entities 1..count cut into parts of ``part_rows``."""
    if part_rows < 1:
        raise ExportError(f"--part-rows: expected >= 1, got {part_rows}")
    return [Part(k, 1 + a, 1 + min(a + part_rows, count)) for k, a in enumerate(range(0, count, part_rows))]


def parts_of_rank(all_parts: list[Part], rank: int, world_size: int) -> list[Part]:
    return all_parts[rank::world_size]


def lookup_rounds(all_parts: list[Part], world_size: int, rows: int) -> int:
    """Lookups every rank makes (sharded lookups are collectives: the same count everywhere)."""
    per_rank = [
        sum(-(-(p.stop - p.start) // rows) for p in parts_of_rank(all_parts, r, world_size)) for r in range(world_size)
    ]
    return max(per_rank, default=0)


# ----------------------------------------------------------------- schema


def vector_schema(id_column: str, dim: int, raw_id_type: pa.DataType | None) -> pa.Schema:
    fields = [pa.field(id_column, pa.int32(), nullable=False)]
    if raw_id_type is not None:
        fields.append(pa.field("raw_id", raw_id_type, nullable=False))
    fields.append(pa.field("vector", pa.list_(pa.float32(), dim), nullable=False))
    return pa.schema(fields)


# ---------------------------------------------------------- staging, publish


def refuse_existing(out: Path) -> None:
    """An existing non-empty --out is never overwritten or mixed into."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(
            f"--out {out}: exists and is not empty (an export writes a new directory; remove it or pick another)"
        )


def new_staging(out: Path) -> Path:
    """An empty ``<out>.tmp-XXXX`` beside ``out`` (same filesystem: the publication is a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))


def publish(staging: Path, out: Path) -> None:
    """The whole export appears at once; an empty --out (allowed) is replaced."""
    refuse_existing(out)
    if out.exists():
        out.rmdir()
    os.rename(staging, out)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- manifest


def checksums(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file below ``root`` but the manifest, by relative path."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """Last, atomically: a directory with manifest.json is a complete export."""
    payload = {"format": EXPORT_FORMAT, **manifest, "files": checksums(root)}
    write_json_atomic(root / MANIFEST, payload, default=str)
    return root / MANIFEST


def read_manifest_text(root: StoragePath) -> str:
    """``manifest.json``'s text below ``root`` (a directory or a ``Location``)."""
    path = root / MANIFEST
    if not (path.is_file() if isinstance(path, Path) else storage.exists(path)):
        raise ExportError(f"{root}: not a complete export ({MANIFEST} missing)")
    return storage.read_text(path)


def parse_manifest(root: StoragePath, text: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{root / MANIFEST}: not valid JSON ({exc})") from None


def read_manifest(root: str | Path | Location) -> dict[str, Any]:
    """The manifest of an export directory or of an export at a URI."""
    where = storage.location(root) if isinstance(root, Location) or storage.is_uri(str(root)) else Path(root)
    return parse_manifest(where, read_manifest_text(where))


def verify_files(root: Path, manifest: dict[str, Any], names: list[str]) -> None:
    """The files ``names`` (relative) exist with the manifest's sha256."""
    for rel in names:
        info = manifest.get("files", {}).get(rel)
        if info is None:
            raise ExportError(f"{root / MANIFEST}: no entry for {rel!r}")
        path = root / rel
        if not path.is_file():
            raise ExportError(f"{path}: missing (listed in {MANIFEST})")
        if sha256_file(path) != info["sha256"]:
            raise ExportError(f"{path}: sha256 does not match {MANIFEST} (modified or corrupted)")
