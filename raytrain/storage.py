"""Where a run's files live: a local directory, or any URI pyarrow's filesystems open
(``s3://bucket/prefix``, ``gs://bucket/prefix``; an S3-compatible server through the URI's query,
``?endpoint_override=HOST:PORT&scheme=http``, or the standard ``AWS_ENDPOINT_URL``).

A ``Location`` is a path on such a filesystem with the few operations a run directory needs. Object
stores differ from a disk in two ways that matter here: an object is written whole (a PUT is atomic,
so every write below is one whole object), and nothing can be appended to (``append`` reads the
object and writes it again with the new line; see raytrain.runs for why that loses no row).

Credentials never travel in a URI (it is recorded in config.json and printed): they come from the
standard AWS environment variables and config files, or the cloud's own (IAM roles, workload
identity), which every Ray process inherits.

This module imports nothing heavy: every worker loads it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from raytrain.errors import UserError, first_line, one_line

_SECRET_PARAMETERS = {"access_key", "secret_key", "session_token"}


class StorageError(UserError):
    """A storage path or URI that cannot be used (one sentence naming it)."""


ACCESS_HINT = (
    "check the endpoint, the bucket and the credentials (AWS_ACCESS_KEY_ID, ~/.aws/credentials)"
)


def check_bucket(where: Location, what: str) -> None:
    """Fail in seconds, in one sentence naming ``what`` (e.g. "run.storage_path 's3://...'"),
    on a bucket that does not exist, credentials it refuses or an endpoint that does not
    answer. A local path passes as it is."""
    if where.local:
        return
    bucket = where.path.partition("/")[0]
    try:
        found = Location(where.fs, bucket, where.scheme, where.query).exists()
    except OSError as e:
        raise StorageError(f"{what} cannot be used: {one_line(e)}; {ACCESS_HINT}") from None
    if not found:
        raise StorageError(f"{what}: bucket {bucket!r} does not exist; create it, or fix its name")


@dataclass(frozen=True)
class Location:
    """A file or directory: ``path`` on ``fs`` (an absolute local path, or ``bucket/key``)."""

    fs: pafs.FileSystem
    path: str
    scheme: str = ""  # "" for a local path, else the URI's scheme ("s3", "gs", ...)
    query: str = ""  # the URI's query (endpoint_override=...), kept so the URI can be shown

    @classmethod
    def of(cls, text: str | os.PathLike | Location) -> Location:
        """A local path (made absolute: Ray workers chdir elsewhere) or a URI."""
        if isinstance(text, Location):
            return text
        text = os.fspath(text)
        if "://" not in text:
            return cls(pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()))
        parts = urlsplit(text)
        secret = _SECRET_PARAMETERS & {key for key, _ in parse_qsl(parts.query)}
        if "@" in parts.netloc or secret:
            raise StorageError(
                f"URI {redact(text)!r} carries credentials; they would be written to "
                "config.json: take them out and use the AWS environment (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY) or ~/.aws/credentials"
            )
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as e:
            raise StorageError(
                f"URI {text!r} is not one pyarrow can open ({first_line(e)}); use a local "
                "path, s3://bucket/prefix or gs://bucket/prefix"
            ) from None
        return cls(fs, path.rstrip("/"), parts.scheme, parts.query)

    # ---- names --------------------------------------------------------------------------------

    @property
    def local(self) -> bool:
        return not self.scheme

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rpartition("/")[2]

    @property
    def parent(self) -> Location:
        return Location(self.fs, self.path.rstrip("/").rpartition("/")[0], self.scheme, self.query)

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", self.scheme, self.query)

    def __str__(self) -> str:
        """The local path, or the URI (with its query) that reaches this object."""
        if self.local:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def as_path(self) -> Path:
        """The local path; only for a local location."""
        assert self.local, self
        return Path(self.path)

    def __fspath__(self) -> str:
        """A local location is a path (``Path(location)``, ``open(location)``); a URI is not."""
        if not self.local:
            raise TypeError(f"{self} is on object storage, not a local path")
        return self.path

    # ---- what is there --------------------------------------------------------------------------

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def size(self) -> int:
        return self._info().size or 0

    def mtime(self) -> float | None:
        """Seconds since the epoch, where the filesystem knows it (object-store prefixes don't)."""
        mtime = self._info().mtime
        return mtime.timestamp() if mtime is not None else None

    def children(self) -> list[Location]:
        """What a directory holds directly, files and directories."""
        found = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [Location(self.fs, info.path, self.scheme, self.query) for info in found]

    # ---- reading and writing -------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        if self.local:
            return Path(self.path).read_bytes()
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Replace the file whole: a reader sees the old content or the new, never half of it."""
        if not self.local:
            # One object, uploaded in one piece: it exists only once the upload completed.
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            return
        path = Path(self.path)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(3)}.tmp")
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    def append(self, data: bytes) -> None:
        """Add ``data`` at the end. On a disk: one write() to a file opened for appending, so a
        process killed mid-write never leaves half a line followed by another. On an object
        store, which cannot append: the object is written again whole, with ``data`` added."""
        if self.local:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            return
        old = self.read_bytes() if self.exists() else b""
        self.write_bytes(old + data)

    def mkdir(self) -> None:
        """Create a directory (and its parents); object stores need none, but a marker keeps an
        empty run visible."""
        self.fs.create_dir(self.path, recursive=True)

    def delete_file(self) -> None:
        self.fs.delete_file(self.path)

    def delete_dir(self) -> None:
        self.fs.delete_dir(self.path)

    @contextmanager
    def local_file(self) -> Iterator[Path]:
        """A local path holding this file: itself on a disk, a temporary download (of the same
        name) from an object store."""
        if self.local:
            yield Path(self.path)
            return
        tmp = tempfile.mkdtemp(prefix="raytrain-download-")
        try:
            local = Path(tmp) / self.name
            local.write_bytes(self.read_bytes())
            yield local
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @contextmanager
    def local_copy(self) -> Iterator[Path]:
        """A local directory with this directory's files: itself on a disk, a temporary
        download from an object store."""
        if self.local:
            yield Path(self.path)
            return
        tmp = tempfile.mkdtemp(prefix="raytrain-download-")
        try:
            pafs.copy_files(self.path, tmp, source_filesystem=self.fs)
            yield Path(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def basename(text: str) -> str:
    """The last name of a path or URI (without the URI's query)."""
    return urlsplit(text).path.rstrip("/").rpartition("/")[2] if "://" in text else Path(text).name


def redact(uri: str) -> str:
    """A URI without the credentials someone put into it, for an error message."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(
        f"{key}={'***' if key in _SECRET_PARAMETERS else value}"
        for key, value in parse_qsl(parts.query)
    )
    return parts._replace(netloc=netloc, query=query).geturl()
