"""Unpacking model archives (.tar, .tar.gz, .tgz, .zip) so that no archive can take more than it is allowed.

An archive is a program for the disk: a few megabytes of gzip can ask for terabytes, a million empty members,
a path outside the target folder or a link to ``/etc``. Every rule is checked before the member it concerns is
written, and the sizes again while bytes are written, so a bomb is stopped where it starts, not after it has
filled the disk:

* names must stay inside the target folder; links, devices and sparse files are refused;
* at most ``max_archive_members`` members;
* at most ``max_unpacked_bytes`` in all, counting what each member declares before writing it and what is
  actually decompressed while writing (a tar's headers count too, and at most :data:`MAX_TAR_HEADER_BYTES`
  of them are read);
* at most ``max_archive_ratio`` times the archive's own size (archives under :data:`RATIO_FLOOR_BYTES` are
  measured as that size, so a small archive of a small model is never refused for its ratio).

Each refusal is a permanent :class:`StorageError` naming the URI, the member and the limit with its setting.
Standard library only; :mod:`rayms.storage` decides when to unpack.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from rayms.errors import StorageError

RATIO_FLOOR_BYTES = 2**20
"""Archives smaller than this are measured as this size when their compression ratio is checked."""
MAX_TAR_HEADER_BYTES = 32 * 2**20
"""Most bytes of headers (member names, pax records) a tar may hold in all."""
_CHUNK = 2**20
_OPENERS = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


@dataclass(frozen=True, slots=True)
class Limits:
    """What one archive may unpack to; :func:`limits_of` reads them from the settings."""

    max_members: int
    max_bytes: int
    max_ratio: int


def limits_of(settings: Any) -> Limits:
    return Limits(max_members=settings.max_archive_members, max_bytes=settings.max_unpacked_bytes,
                  max_ratio=settings.max_archive_ratio)


def inside(root: Path, name: str, *, uri: str) -> Path:
    """``root/name`` if ``name`` is a plain relative path that stays inside ``root``; else refuse it."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not name or name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise StorageError(f"{uri}: refusing member {name!r}: it escapes the target folder")
    return root.joinpath(*parts)


def unpack(archive: Path, *, into: Path, uri: str, limits: Limits) -> None:
    """Unpack ``archive`` into the existing folder ``into`` (left partly filled on error: the caller drops it)."""
    budget = _Budget(uri=uri, packed=archive.stat().st_size, limits=limits)
    try:
        if archive.name.lower().endswith(".zip"):
            _unzip(archive, into=into, budget=budget)
        else:
            _untar(archive, into=into, budget=budget)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise StorageError(f"{uri}: {archive.name} is not a valid archive: {exc}") from exc


class _Budget:
    """Running totals of one archive against its limits."""

    def __init__(self, *, uri: str, packed: int, limits: Limits) -> None:
        self.uri, self.limits = uri, limits
        self.ratio_bytes = limits.max_ratio * max(packed, RATIO_FLOOR_BYTES)
        self.members = 0
        self.declared = 0  # bytes the members seen so far say they hold
        self.unpacked = 0  # bytes actually decompressed so far

    def member(self, name: str, size: int) -> None:
        """Account for a member before any of its bytes are written."""
        self.members += 1
        if self.members > self.limits.max_members:
            self.refuse(name, f"the archive has more than {self.limits.max_members} members "
                               "(max_archive_members)")
        self.declared += size
        self._check(name, self.declared, what="unpacks to")

    def wrote(self, name: str | None, count: int) -> None:
        """Account for ``count`` bytes decompressed while extracting."""
        self.unpacked += count
        self._check(name, self.unpacked, what="unpacked")

    def _check(self, name: str | None, total: int, *, what: str) -> None:
        if total > self.limits.max_bytes:
            self.refuse(name, f"the archive {what} more than {self.limits.max_bytes} bytes (max_unpacked_bytes)")
        if total > self.ratio_bytes:
            self.refuse(name, f"the archive {what} more than {self.limits.max_ratio} times its own size "
                               "(max_archive_ratio)")

    def refuse(self, name: str | None, why: str) -> None:
        """Stop with ``why``; ``name`` is the member concerned (``None``: headers before any member)."""
        what = f"member {name!r}" if name is not None else "the archive"
        raise StorageError(f"{self.uri}: refusing {what}: {why}")


def _unzip(archive: Path, *, into: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()  # the central directory: names and declared sizes, nothing decompressed yet
        for info in members:
            inside(into, info.filename, uri=budget.uri)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise StorageError(f"{budget.uri}: refusing member {info.filename!r}: symlinks are not allowed")
            budget.member(info.filename, info.file_size)
        for info in members:
            target = inside(into, info.filename, uri=budget.uri)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as source, open(target, "wb") as sink:
                _copy(source, sink, name=info.filename, budget=budget)


def _untar(archive: Path, *, into: Path, budget: _Budget) -> None:
    # A stream read (mode "r|"), decompressed by a reader that counts: members come one at a time in order,
    # nothing seeks back, and every byte the decompressor yields is counted before tarfile sees it.
    with open(archive, "rb") as raw:
        magic = raw.read(6)
    opener = next((open_ for prefix, open_ in _OPENERS if magic.startswith(prefix)), open)
    with opener(archive, "rb") as plain:
        reader = _CountingReader(plain, budget=budget)
        with tarfile.open(fileobj=reader, mode="r|") as tf:
            for member in tf:
                inside(into, member.name, uri=budget.uri)
                if member.issparse() or not (member.isfile() or member.isdir()):
                    kind = ("links" if member.issym() or member.islnk() else
                            "sparse files" if member.issparse() else "devices and special files")
                    raise StorageError(f"{budget.uri}: refusing member {member.name!r}: {kind} are not allowed")
                budget.member(member.name, member.size)
                reader.allow(member)
                tf.extract(member, into, filter="data")


class _CountingReader:
    """The decompressed tar stream, counted: data bytes against the unpacked limits, the rest against
    :data:`MAX_TAR_HEADER_BYTES` (headers are read before their member can be checked)."""

    def __init__(self, stream: IO[bytes], *, budget: _Budget) -> None:
        self._stream, self._budget = stream, budget
        self._read = 0
        self._data = 0  # bytes of accepted members' data (rounded up to tar blocks)
        self._name: str | None = None  # the member whose data is being read (None: before the first)

    def allow(self, member: tarfile.TarInfo) -> None:
        self._name = member.name
        self._data += -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE

    def read(self, size: int = -1) -> bytes:
        try:
            chunk = self._stream.read(_CHUNK if size is None or size < 0 else min(size, _CHUNK))
        except (OSError, EOFError, lzma.LZMAError) as exc:  # how gzip, bz2 and lzma report a corrupt stream
            raise tarfile.ReadError(f"cannot decompress: {exc}") from exc
        self._read += len(chunk)
        self._budget.wrote(self._name, len(chunk))
        if self._read - self._data > MAX_TAR_HEADER_BYTES:
            self._budget.refuse(None, f"its headers take more than {MAX_TAR_HEADER_BYTES} bytes")
        return chunk


def _copy(source: IO[bytes], sink: IO[bytes], *, name: str, budget: _Budget) -> None:
    while chunk := source.read(_CHUNK):
        budget.wrote(name, len(chunk))
        sink.write(chunk)

