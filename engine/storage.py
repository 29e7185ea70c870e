"""Files in a run's storage location, on any pyarrow filesystem (as Ray Train's `storage_path`).

A location is a local or mounted path (the fast default), a `file://` URI, or an object store
(`s3://bucket/prefix`, `gs://bucket/prefix`, resolved by `pyarrow.fs.FileSystem.from_uri`, so
credentials and options come from the environment or the URI's query, e.g. `?region=...`).
`StoragePath` is the part of pathlib the engine uses (`/`, name, parent, exists, glob, read and
write), so one code path writes checkpoints, maps, predictions and cell tables to any of them.
Files are written whole: to `NAME.tmp`, then moved onto NAME (a crash never leaves half a file).
It pickles with its filesystem, so Ray workers and actors receive it as it is.
"""
from __future__ import annotations

import contextlib
import fnmatch
import io
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import pyarrow as pa
import pyarrow.fs as pafs

from engine.options import DataError


class StoragePath:
    """A file or folder: a pyarrow filesystem and a path in it (`scheme` prefixes it for display)."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, scheme: str = "") -> None:
        self.fs, self.path, self.scheme = filesystem, path.rstrip("/") or "/", scheme

    @classmethod
    def from_uri(cls, uri: str) -> StoragePath:
        """A local path (made absolute) or a URI pyarrow knows (file, s3, gs, hdfs, ...); bad or
        unreachable ones are a one-line DataError."""
        text = str(uri)
        if "://" not in text:
            return cls(pafs.LocalFileSystem(), str(Path(text).resolve()))
        try:
            filesystem, path = pafs.FileSystem.from_uri(text)
        except (OSError, ValueError, TypeError) as error:
            raise DataError(f"--storage {text}: {' '.join(str(error).split())}") from error
        if isinstance(filesystem, pafs.LocalFileSystem):
            return cls(filesystem, str(Path(path).resolve()))
        return cls(filesystem, path, text.split("://", 1)[0] + "://")

    @property
    def local(self) -> Path | None:
        """The path on this machine's disk (or a mount), None on an object store."""
        return Path(self.path) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def __truediv__(self, name: str) -> StoragePath:
        return StoragePath(self.fs, f"{self.path}/{name}", self.scheme)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> StoragePath:
        return StoragePath(self.fs, self.path.rsplit("/", 1)[0] or "/", self.scheme)

    def __str__(self) -> str:
        return self.scheme + self.path

    def __repr__(self) -> str:
        return f"StoragePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoragePath) and (type(self.fs), str(self)) == (type(other.fs), str(other))

    def __hash__(self) -> int:
        return hash(str(self))

    def _type(self) -> Any:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def glob(self, pattern: str) -> list[StoragePath]:
        """The files directly in this folder whose names match `pattern`, sorted; none if it is absent."""
        found = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((StoragePath(self.fs, f.path, self.scheme) for f in found
                       if f.type == pafs.FileType.File and fnmatch.fnmatch(f.base_name, pattern)), key=str)

    def mkdir(self) -> None:
        """Create the folder and its parents (a no-op where folders are implicit, e.g. S3)."""
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    @contextlib.contextmanager
    def open_output(self) -> Iterator[pa.NativeFile]:
        """A stream that writes the whole file: to NAME.tmp, moved onto NAME when the block ends."""
        self.parent.mkdir()
        tmp = f"{self.path}.tmp"
        with self.fs.open_output_stream(tmp) as stream:
            yield stream
        self.fs.move(tmp, self.path)

    def write_bytes(self, data: bytes) -> None:
        with self.open_output() as stream:
            stream.write(data)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())


PathLike = Union[str, Path, StoragePath]


def as_storage(path: PathLike) -> StoragePath:
    """`path` as a StoragePath (a str or Path is a local path unless it is a URI)."""
    return path if isinstance(path, StoragePath) else StoragePath.from_uri(str(path))


def to_bytes(write: Callable[[io.BytesIO], Any]) -> bytes:
    """What `write(buffer)` writes (e.g. `lambda f: torch.save(payload, f)`), as bytes."""
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()
