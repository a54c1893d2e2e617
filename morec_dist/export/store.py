"""An export at a filesystem URI (``s3://bucket/runs/r1/export?...``, any pyarrow filesystem):
where it is staged, how it is published, how it is read back.

An object store has no rename, so an export to a URI is staged in a local directory (the
ranks write there exactly what they write beside a local ``--out``), then ``publish``
uploads every file and ``manifest.json`` last: one upload, visible whole or not at all, the
commit point (as a prepared dataset's manifest and a checkpoint's meta.json are). A
destination without ``manifest.json`` is not an export; a failed publication removes what
it uploaded, and never writes the manifest. ``local_copy`` brings an export at a URI to a
temporary directory for ``morec evaluate --ann``, each file checked against the manifest's
sha256 as it arrives.

The staging directory is one local directory shared by the export's ranks: one node (one
pod), which is how the pipeline runs the export (k8s/base/export.yaml); ``check_staged``
refuses to publish when a rank's files are missing from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from morec_dist.data import storage
from morec_dist.data.storage import Location, StorageError, StoragePath
from morec_dist.export import layout
from morec_dist.export.layout import MANIFEST, ExportError, parse_manifest, read_manifest_text

CHUNK = 1 << 22  # bytes per read while uploading / downloading


def out_location(out: str | Path | Location) -> StoragePath:
    """``--out`` as a local directory (resolved) or a ``Location``; a URI carrying
    credentials is refused naming ``--out``."""
    try:
        return storage.location(out)
    except StorageError as exc:
        raise ExportError(f"--out {exc}") from None


def is_empty(where: Location) -> bool:
    """No object at ``where`` and none below it (empty "directories", markers that pyarrow
    keeps after a delete, do not count)."""
    info = where.fs.get_file_info(where.path)
    if info.type in (pafs.FileType.NotFound, pafs.FileType.File):
        return info.type == pafs.FileType.NotFound
    return not storage.files_below(where)


def staging_dir(out: StoragePath) -> Path:
    """A new staging directory's name (not created): ``<out>.tmp-XXXX`` beside a local
    ``out`` (the publication is a rename), in TMPDIR for a URI."""
    if isinstance(out, Path):
        return Path(f"{out}.tmp-{secrets.token_hex(4)}")
    return Path(tempfile.gettempdir()) / f"morec-export-{out.name}-{secrets.token_hex(4)}"


def check_staged(staging: Path, expected: list[str]) -> None:
    """Every file the manifest will list (the ranks' parts) is in the staging directory: a
    rank on another node than rank 0 writes into its own node's copy of it."""
    missing = [rel for rel in expected if not (staging / rel).is_file()]
    if missing:
        raise ExportError(
            f"{staging}: {len(missing)} file(s) the ranks wrote are not there ({missing[0]}, ...): an export to a "
            "URI stages on one node; run its ranks in one pod/host (--nproc), or set TMPDIR to a directory they share"
        )


def refuse_existing(out: StoragePath) -> None:
    """An existing non-empty --out, a directory or a prefix, is never overwritten or mixed into."""
    if isinstance(out, Path):
        layout.refuse_existing(out)
    elif not is_empty(out):
        raise ExportError(
            f"--out {out}: exists and is not empty (an export writes a new prefix; remove it or pick another)"
        )


def new_staging(out: StoragePath) -> Path:
    """An empty staging directory: beside a local ``out`` (published by a rename), in TMPDIR
    for a URI (published by uploads)."""
    if isinstance(out, Path):
        return layout.new_staging(out)
    path = staging_dir(out)
    path.mkdir(parents=True)
    return path


def publish(staging: Path, out: StoragePath) -> None:
    """The whole export appears at once: a rename locally; at a URI every file of the
    staging directory uploaded, ``manifest.json`` last, and on any failure what was uploaded
    removed (best effort: the manifest first), so the destination never has a manifest."""
    if isinstance(out, Path):
        layout.publish(staging, out)
        return
    refuse_existing(out)
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    if MANIFEST not in files:
        raise ExportError(f"{staging}: no {MANIFEST} to publish")
    uploaded: list[Location] = []
    try:
        for rel in [f for f in files if f != MANIFEST] + [MANIFEST]:
            uploaded.append(out / rel)
            storage.upload(staging / rel, out / rel)
    except BaseException:
        remove(uploaded)
        raise
    layout.discard(staging)


def remove(locations: list[Location]) -> None:
    """Best effort, the last first (so a manifest goes before the files it lists)."""
    for where in reversed(locations):
        with contextlib.suppress(OSError):
            where.fs.delete_file(where.path)


def discard_unpublished(out: Location) -> None:
    """After ranks that failed: the files below ``out`` if it has no manifest (it was empty
    when the export was checked, so they are the export's); a published export is kept."""
    with contextlib.suppress(OSError):
        if storage.exists(out / MANIFEST) or is_empty(out):
            return
        out.fs.delete_dir_contents(out.path, missing_dir_ok=True)


def download_checked(where: Location, local: Path, sha256: str) -> None:
    """``where`` to ``local``, its sha256 checked against the manifest's on the way."""
    local.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with where.fs.open_input_stream(where.path) as src, open(local, "wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
    except FileNotFoundError:
        raise ExportError(f"{where}: missing (listed in {MANIFEST})") from None
    if digest.hexdigest() != sha256:
        raise ExportError(f"{where}: sha256 does not match {MANIFEST} (modified or corrupted)")


@contextlib.contextmanager
def local_copy(root: str | Path) -> Iterator[Path]:
    """``root`` itself when local; an export at a URI downloaded (its manifest, read once,
    and every file it lists, each checked) to a temporary directory removed on exit."""
    if not storage.is_uri(str(root)):
        yield Path(root)
        return
    where = storage.location(root)
    assert isinstance(where, Location)
    text = read_manifest_text(where)
    with tempfile.TemporaryDirectory(prefix="morec-ann-") as tmp:
        local = Path(tmp)
        for rel, info in sorted(parse_manifest(where, text).get("files", {}).items()):
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ExportError(f"{where / MANIFEST}: lists {rel!r}, not a path inside the export")
            download_checked(where / rel, local / rel, info["sha256"])
        (local / MANIFEST).write_text(text)
        yield local
