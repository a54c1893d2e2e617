"""DCP's filesystem writer and reader over any pyarrow filesystem (s3://, gs://, hdfs://...).

torch.distributed.checkpoint writes through a ``FileSystemBase`` (streams, paths, rename);
its own fsspec one needs s3fs / gcsfs, while the data side already reaches every store
through pyarrow (``data/storage.py``). This module is that ``FileSystemBase`` on a pyarrow
filesystem, so a checkpoint at ``s3://bucket/run/checkpoints/step-N?endpoint_override=...``
is DCP's ordinary file layout (``__<rank>_0.distcp`` per rank, ``.metadata``) written with
the same credentials chain as the data. A file is complete when its upload is (an S3 PUT
is atomic), so no fsync; DCP's ``.metadata`` rename is a copy + delete on an object store,
and what makes a checkpoint exist is our ``meta.json``, written after it (checkpoint.py).
"""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import pyarrow.fs as pafs
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter

from morec_dist.data.storage import Location


class _ReadableFile(io.RawIOBase):
    """A pyarrow random-access file as a Python binary file (pickle and torch.load need
    ``readinto`` / ``readline``, DCP seeks to each item's offset)."""

    def __init__(self, native: Any):
        self._f = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._f.read(len(buffer))
        n = len(data)
        memoryview(buffer).cast("B")[:n] = data
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._f.seek(offset, whence))

    def tell(self) -> int:
        return int(self._f.tell())

    def close(self) -> None:
        self._f.close()
        super().close()


class PyArrowFileSystem(FileSystemBase):
    """DCP paths are plain strings inside one pyarrow filesystem (set by ``init_path``)."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        path = os.fspath(path)
        if "r" in mode:
            with io.BufferedReader(_ReadableFile(self.fs.open_input_file(path)), 1 << 20) as stream:
                yield stream
            return
        native = self.fs.open_output_stream(path)
        try:
            yield native
        except BaseException:
            native.close()  # what was written goes up, and is removed: never a half file under the name
            self.rm_file(path)
            raise
        native.close()

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return posixpath.join(os.fspath(path), suffix)

    def init_path(self, path: str | os.PathLike, **kwargs: Any) -> str:
        return os.fspath(path)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.fs.move(os.fspath(path), os.fspath(new_path))

    def mkdir(self, path: str | os.PathLike) -> None:
        self.fs.create_dir(os.fspath(path), recursive=True)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False  # never picked by DCP's guessing: always passed explicitly

    def exists(self, path: str | os.PathLike) -> bool:
        return bool(self.fs.get_file_info(os.fspath(path)).type != pafs.FileType.NotFound)

    def rm_file(self, path: str | os.PathLike) -> None:
        self.fs.delete_file(os.fspath(path))

    def ls(self, path: str | os.PathLike) -> list[str]:
        selector = pafs.FileSelector(os.fspath(path), allow_not_found=True)
        return [info.path for info in self.fs.get_file_info(selector)]


def storage_writer(where: Location) -> FileSystemWriter:
    """DCP's writer (one file per rank, as locally) into ``where``; no fsync: an upload is
    durable when it completes."""
    writer = FileSystemWriter(where.path, sync_files=False)
    writer.fs = PyArrowFileSystem(where.fs)  # type: ignore[assignment]  # DCP's FileSystemBase contract
    writer.path = where.path
    return writer


def storage_reader(where: Location) -> FileSystemReader:
    reader = FileSystemReader(where.path)
    reader.fs = PyArrowFileSystem(where.fs)  # type: ignore[assignment]  # DCP's FileSystemBase contract
    reader.path = where.path
    return reader
