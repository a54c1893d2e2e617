"""Where a prepared dataset's bytes live: a local directory or any pyarrow filesystem URI.

Owns the one step from a location to bytes. ``location(s)`` turns a string into a local
``pathlib.Path`` (resolved) or a ``Location`` (``s3://``, ``gs://``, ``hdfs://``...: a pyarrow
filesystem and a path inside it); the helpers below (``parquet_file``, ``read_table``,
``exists``, ``size``, ``read_text``, ``sha256``) take either, so the dataset handle and the
readers read the same bytes, with the same checks, from both. Local paths stay ``Path`` so
that every local code path is unchanged.

Options of the store go in the URI's query, as for `morec prepare parquet`'s inputs
(``s3://bucket/prefix?endpoint_override=host:port&scheme=http&region=...``); credentials come
from the environment or the cloud's usual chain (pyarrow's), never from a file of ours: a
URI that carries them (``s3://KEY:SECRET@bucket``, ``?secret_key=...``) is refused, since
URIs end up in configs, meta.json and metrics.json.
"""

from __future__ import annotations

import hashlib
import posixpath
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from morec_dist.data.schema import sha256_file

HASH_CHUNK = 1 << 22
CREDENTIAL_KEYS = ("access_key", "secret_key", "session_token")  # pyarrow's S3 URI options


class StorageError(ValueError):
    """A location that cannot be used as given (a URI carrying credentials)."""


def is_uri(value: str | Path) -> bool:
    """A ``scheme://`` string other than ``file://`` (pathlib paths are never URIs)."""
    return isinstance(value, str) and "://" in value and not value.startswith("file://")


@dataclass(frozen=True)
class Location:
    """A path inside a pyarrow filesystem: joined with ``/`` like a ``Path``; ``str()`` is the
    URI without its query (for messages: the query may name an endpoint, never a secret)."""

    fs: pafs.FileSystem = field(compare=False, repr=False)
    path: str  # inside ``fs``: bucket/key for object stores
    scheme: str
    query: str = ""  # the store's options, kept so that ``uri`` recreates the filesystem

    def __truediv__(self, rel: str | Path) -> Location:
        return Location(self.fs, posixpath.join(self.path, str(rel)), self.scheme, self.query)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    @property
    def uri(self) -> str:
        """The full URI, query included: what another process passes to ``location``."""
        return str(self) + (f"?{self.query}" if self.query else "")

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path.rstrip("/")), self.scheme, self.query)

    def resolve(self) -> Location:
        return self

    def exists(self) -> bool:
        return exists(self)

    def is_dir(self) -> bool:
        return bool(self.fs.get_file_info(self.path).type == pafs.FileType.Directory)

    def read_text(self) -> str:
        return read_text(self)


StoragePath = Path | Location


def location(value: str | Path | Location) -> StoragePath:
    """A local path (resolved) or a ``Location`` for a filesystem URI; idempotent."""
    if isinstance(value, Location):
        return value
    if not is_uri(value):
        text = str(value)
        return Path(text.removeprefix("file://")).resolve()
    text = str(value)
    _refuse_credentials(text)
    fs, path = pafs.FileSystem.from_uri(text)
    scheme = text.split("://", 1)[0]
    query = text.split("?", 1)[1] if "?" in text else ""
    return Location(fs, path.rstrip("/"), scheme, query)


def _refuse_credentials(uri: str) -> None:
    parts = urllib.parse.urlsplit(uri)
    keys = {k for k, _ in urllib.parse.parse_qsl(parts.query)} & set(CREDENTIAL_KEYS)
    if "@" in parts.netloc or keys:
        where = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"
        raise StorageError(
            f"{where}: the URI carries credentials ({', '.join(sorted(keys)) or 'user:secret@'}); give them in the "
            "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, a profile or a workload identity) instead"
        )


def uri_of(value: StoragePath) -> str:
    """What another process (a rank, a job) passes to ``location`` to reach the same place."""
    return value.uri if isinstance(value, Location) else str(value)


def is_local(value: StoragePath) -> bool:
    return isinstance(value, Path)


def _split(value: StoragePath) -> tuple[pafs.FileSystem | None, str | Path]:
    return (value.fs, value.path) if isinstance(value, Location) else (None, value)


def parquet_file(value: StoragePath, **kwargs: Any) -> pq.ParquetFile:
    fs, path = _split(value)
    return pq.ParquetFile(path, filesystem=fs, **kwargs)


def read_table(value: StoragePath, **kwargs: Any) -> Any:
    fs, path = _split(value)
    return pq.read_table(path, filesystem=fs, **kwargs)


def read_schema(value: StoragePath) -> Any:
    fs, path = _split(value)
    return pq.read_schema(path, filesystem=fs)


def exists(value: StoragePath) -> bool:
    if isinstance(value, Path):
        return value.exists()
    return bool(value.fs.get_file_info(value.path).type != pafs.FileType.NotFound)


def files_below(where: Location) -> list[str]:
    """The paths of every file below the prefix ``where`` (none if it does not exist)."""
    selector = pafs.FileSelector(where.path, allow_not_found=True, recursive=True)
    return [i.path for i in where.fs.get_file_info(selector) if i.type == pafs.FileType.File]


def upload(local: Path, target: Location) -> None:
    """A local file to ``target``, streamed in HASH_CHUNK reads: one object, visible whole or not at all."""
    with open(local, "rb") as src, target.fs.open_output_stream(target.path) as dst:
        while chunk := src.read(HASH_CHUNK):
            dst.write(chunk)


def size(value: StoragePath) -> int:
    if isinstance(value, Path):
        return value.stat().st_size
    return int(value.fs.get_file_info(value.path).size)


def read_bytes(value: StoragePath) -> bytes:
    if isinstance(value, Path):
        return value.read_bytes()
    with value.fs.open_input_stream(value.path) as f:
        return bytes(f.read())


def read_text(value: StoragePath) -> str:
    return read_bytes(value).decode("utf-8")


def sha256(value: StoragePath) -> str:
    """The file's sha256, streamed in 4 MiB reads (the same digest as schema.sha256_file)."""
    if isinstance(value, Path):
        return sha256_file(value, HASH_CHUNK)
    digest = hashlib.sha256()
    with value.fs.open_input_stream(value.path) as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
