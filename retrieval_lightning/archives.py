"""Safe extraction of tar, tar.gz, tgz and zip archives; knows no dataset and no HTTP.

Why it exists: downloaded archives are untrusted. Three layers keep every write inside the
target directory:

1. Before anything is written, every member is checked lexically (absolute paths, ``..``
   climbing out, link targets leaving the root, devices and fifos, hardlinks to a missing or
   non-file member) and the declared sizes are bounded (total bytes and compression ratio).
2. Just before each member is written, Python's own ``tarfile.data_filter`` checks it against
   the tree as it is on disk at that moment (it resolves links with ``realpath``), and after
   every link the archive makes, all links it made so far are checked again: a later member
   that retargets a directory link cannot turn an earlier link into an escape.
3. File data goes to a temporary name opened with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a planted
   link at that name is never followed) and is renamed into place.

An archive that cannot be read to its end (truncated data or header, bad CRC, not an archive,
a malformed member) raises :class:`CorruptArchiveError` so the caller can fetch it again; what
was written by a failed extraction is removed again.
"""

from __future__ import annotations

import errno
import gzip
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator

_CHUNK = 1 << 20
#: default bound on the bytes one archive may extract (1 TiB)
MAX_EXTRACTED_BYTES = 1 << 40
#: default bound on extracted bytes per archive byte (deflate tops out near 1032:1)
MAX_COMPRESSION_RATIO = 100.0
_RATIO_FLOOR = 64 << 20  # tiny archives (md5 lists, csv) may expand freely up to this
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the target directory, is not a file, or is a bomb."""


class CorruptArchiveError(Exception):
    """The archive cannot be read to its end (truncated, bad CRC, malformed member); fetch it again."""


@dataclass(frozen=True)
class _Member:
    name: str
    kind: str  # "file", "dir", "symlink", "hardlink" or "other"
    link: str
    size: int
    open: Callable[[], IO[bytes] | None]


def _normalise(archive: Path, member: str, name: str) -> PurePosixPath:
    """Resolve ``.``/``..`` lexically; refuse absolute paths and anything climbing above the root."""
    text = name.replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise UnsafeArchiveError(f"{archive}: member {member!r} uses an absolute path {name!r}")
    parts: list[str] = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise UnsafeArchiveError(f"{archive}: member {member!r} escapes the target directory via {name!r}")
            parts.pop()
        else:
            parts.append(part)
    return PurePosixPath(*parts)


def _recording_tarinfo() -> type[tarfile.TarInfo]:
    """A TarInfo class that remembers why the member listing stopped.

    ``tarfile`` ends its listing silently at a header cut short or garbled anywhere but the
    start; only an all-zero end-of-archive block is a proper end.
    """

    class _Recording(tarfile.TarInfo):
        stop: Exception | None = None

        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(tar)
            except tarfile.HeaderError as exc:
                _Recording.stop = exc
                raise

    return _Recording


def _tar_members(archive: Path, tar: tarfile.TarFile, size: int | None,
                 recording: type[tarfile.TarInfo]) -> Iterator[_Member]:
    seen: dict[PurePosixPath, tuple[str, int]] = {}
    for info in tar:
        if size is not None and info.isreg() and info.offset_data + info.size > size:
            raise CorruptArchiveError(f"{archive}: member {info.name!r} is cut short")
        kind = ("file" if info.isreg() else "dir" if info.isdir() else "symlink" if info.issym()
                else "hardlink" if info.islnk() else "other")
        length = info.size if kind == "file" else 0
        if kind == "hardlink":
            source_kind, length = seen.get(_normalise(archive, info.name, info.linkname), ("", 0))
            if source_kind != "file":
                what = "a directory" if source_kind == "dir" else "no earlier file"
                raise CorruptArchiveError(f"{archive}: hardlink {info.name!r} points to {what} ({info.linkname!r})")
        try:
            seen[_normalise(archive, info.name, info.name)] = ("file" if kind == "hardlink" else kind, length)
        except UnsafeArchiveError:
            pass  # reported by the member's own check
        yield _Member(info.name, kind, info.linkname, length, lambda info=info: tar.extractfile(info))
    if not isinstance(getattr(recording, "stop", None), tarfile.EOFHeaderError):
        stop = getattr(recording, "stop", None)
        raise CorruptArchiveError(f"{archive}: ends inside a header or without an end-of-archive block ({stop})")


def _zip_members(archive: zipfile.ZipFile) -> Iterator[_Member]:
    for info in archive.infolist():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            yield _Member(info.filename, "symlink", archive.read(info).decode(), 0, lambda info=info: archive.open(info))
        else:
            kind = "dir" if info.is_dir() else "file"
            yield _Member(info.filename, kind, "", info.file_size, lambda info=info: archive.open(info))


def _check(archive: Path, member: _Member) -> PurePosixPath:
    """The member's safe relative path; raises if it or its link target leaves the root lexically."""
    rel = _normalise(archive, member.name, member.name)
    if not rel.parts and member.kind != "dir":
        raise UnsafeArchiveError(f"{archive}: member {member.name!r} would replace the target directory itself")
    if member.kind == "other":
        raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a device or fifo; refusing it")
    if member.kind == "symlink":
        if member.link.startswith("/"):
            raise UnsafeArchiveError(f"{archive}: member {member.name!r} links outside to {member.link!r}")
        _normalise(archive, member.name, str(rel.parent / member.link))
    if member.kind == "hardlink":
        _normalise(archive, member.name, member.link)
    return rel


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


@dataclass
class _Extraction:
    """One extraction in progress: what it created (undone on failure) and the byte budget left."""

    archive: Path
    target: Path
    root: str
    budget: int
    created: list[Path] = field(default_factory=list)
    links: list[Path] = field(default_factory=list)

    def check_on_disk(self, member: _Member, rel: PurePosixPath) -> None:
        """``tarfile.data_filter`` against the tree as it is now (links resolved by ``realpath``)."""
        info = tarfile.TarInfo(str(rel))
        info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}.get(member.kind, tarfile.REGTYPE)
        info.linkname = member.link if member.kind == "symlink" else ""
        info.mode = 0o644
        try:
            tarfile.data_filter(info, self.root)
        except (tarfile.LinkOutsideDestinationError, tarfile.AbsoluteLinkError):
            raise UnsafeArchiveError(f"{self.archive}: member {member.name!r} links outside to {member.link!r}") \
                from None
        except tarfile.FilterError as exc:
            raise UnsafeArchiveError(f"{self.archive}: member {member.name!r} would be written outside "
                                     f"{self.root} through a link ({exc})") from None

    def check_links(self, member: _Member) -> None:
        """Every link made so far must still resolve inside the root (a later link may retarget a directory)."""
        for link in self.links:
            if os.path.islink(link) and not _inside(self.root, os.path.realpath(link)):
                raise UnsafeArchiveError(f"{self.archive}: member {member.name!r} makes the earlier link "
                                         f"{str(link.relative_to(self.target))!r} point outside {self.root}")

    def mkdir(self, path: Path) -> None:
        missing = [p for p in [path, *path.parents] if not os.path.lexists(p)]
        path.mkdir(parents=True, exist_ok=True)
        self.created.extend(reversed(missing))

    def write(self, member: _Member, path: Path) -> None:
        """Copy the member's data to ``path`` via a fresh temporary file that no link can redirect."""
        self.mkdir(path.parent)
        source = member.open()
        if source is None:
            raise CorruptArchiveError(f"{self.archive}: member {member.name!r} has no data")
        tmp = path.with_name(f".{path.name}.extracting")
        try:
            fd = os.open(tmp, _OPEN_FLAGS, 0o644)
        except FileExistsError:
            os.unlink(tmp)  # a stale temporary file, or a link planted there: removed, never followed
            fd = os.open(tmp, _OPEN_FLAGS, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeArchiveError(f"{self.archive}: member {member.name!r}: {tmp} is a link") from None
            raise
        existed = os.path.lexists(path)
        try:
            with source, os.fdopen(fd, "wb") as out:
                while chunk := source.read(_CHUNK):
                    self.budget -= len(chunk)
                    if self.budget < 0:
                        raise UnsafeArchiveError(f"{self.archive}: member {member.name!r} expands beyond the "
                                                 "extraction size bound (a decompression bomb?)")
                    out.write(chunk)
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        if not existed:
            self.created.append(path)

    def symlink(self, member: _Member, path: Path) -> None:
        self.mkdir(path.parent)
        if os.path.lexists(path):
            if path.is_dir() and not path.is_symlink():
                raise UnsafeArchiveError(f"{self.archive}: member {member.name!r} replaces a directory by a link")
            path.unlink()
        os.symlink(member.link, path)
        self.created.append(path)
        self.links.append(path)

    def undo(self) -> None:
        """Remove what this extraction created (links and files first, then empty directories)."""
        for path in reversed(self.created):
            try:
                if path.is_symlink() or not path.is_dir():
                    path.unlink()
                else:
                    path.rmdir()
            except OSError:
                pass


def _budget(archive: Path, members: list[_Member], max_bytes: int, max_ratio: float) -> int:
    """Bytes the archive may extract; refuses one whose declared sizes already exceed it."""
    size = archive.stat().st_size
    limit = int(min(max_bytes, max(max_ratio * size, _RATIO_FLOOR)))
    declared = sum(m.size for m in members)
    if declared > limit:
        raise UnsafeArchiveError(f"{archive}: declares {declared} bytes of content for {size} archive bytes, "
                                 f"beyond the bound of {limit} (max_bytes={max_bytes}, max_ratio={max_ratio})")
    return limit


def extract_archive(archive: Path, target: Path, flatten: bool = False, *,
                    max_bytes: int = MAX_EXTRACTED_BYTES, max_ratio: float = MAX_COMPRESSION_RATIO) -> int:
    """Unpack ``archive`` into ``target`` after checking every member; returns files written.

    The whole member list is checked before anything is written: an absolute path, a ``..``
    climbing out, a link pointing outside, a device member or content beyond ``max_bytes`` (or
    ``max_ratio`` times the archive size) raises :class:`UnsafeArchiveError` naming the archive
    and the member; an archive that cannot be read to its end, or with a malformed member,
    raises :class:`CorruptArchiveError`. Each member is checked again against the disk when it
    is written. On any error, what this call created is removed. ``flatten`` keeps regular
    files only, under their base names (links and directories are skipped).
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(target)
    recording = _recording_tarinfo()
    try:
        if _starts_as_zip(archive) and zipfile.is_zipfile(archive):
            handle: tarfile.TarFile | zipfile.ZipFile = zipfile.ZipFile(archive)
        else:
            handle = tarfile.open(archive, "r:*", tarinfo=recording)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise CorruptArchiveError(f"{archive}: cannot open archive: {exc}") from exc
    with handle:
        try:
            if isinstance(handle, zipfile.ZipFile):
                members = list(_zip_members(handle))
            else:
                size = archive.stat().st_size if _is_plain_tar(archive) else None
                members = list(_tar_members(archive, handle, size, recording))
                if size is None:
                    _read_to_end(archive, handle.fileobj)
            checked = [(member, _check(archive, member)) for member in members]
            job = _Extraction(archive, target, root, _budget(archive, members, max_bytes, max_ratio))
            if isinstance(handle, zipfile.ZipFile) and (bad := handle.testzip()) is not None:
                raise CorruptArchiveError(f"{archive}: member {bad!r} fails its CRC")
            try:
                return _unpack(job, checked, flatten)
            except BaseException:
                job.undo()
                raise
        except (tarfile.ReadError, EOFError, zlib.error, zipfile.BadZipFile, gzip.BadGzipFile, KeyError) as exc:
            raise CorruptArchiveError(f"{archive}: cannot be read to its end: {exc}") from exc


def _starts_as_zip(archive: Path) -> bool:
    """A zip's first bytes are a local header (or an empty zip's end record). ``zipfile.is_zipfile`` alone
    finds an end record anywhere in the last 64 KiB: a tar whose last member is a zip would pass for it."""
    with open(archive, "rb") as handle:
        return handle.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def _read_to_end(archive: Path, stream: IO[bytes] | None) -> None:
    """Decompress what follows the tar's end-of-archive block, before anything is written: gzip (CRC-32 and
    length), bzip2 and xz check the data only at the end of their stream, which listing the members stops
    short of. Every error here is of the archive's bytes (nothing is being written yet)."""
    try:
        while stream is not None and stream.read(_CHUNK):
            pass
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise CorruptArchiveError(f"{archive}: fails its compression check at the end: {exc}") from exc


def _is_plain_tar(archive: Path) -> bool:
    with open(archive, "rb") as handle:
        head = handle.read(4)
    return not head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zX"))


def _unpack(job: _Extraction, checked: list[tuple[_Member, PurePosixPath]], flatten: bool) -> int:
    written = 0
    for member, rel in checked:
        if flatten:
            if member.kind in ("file", "hardlink") and rel.name:
                job.check_on_disk(member, PurePosixPath(rel.name))
                job.write(member, job.target / rel.name)
                written += 1
            continue
        job.check_on_disk(member, rel)
        path = job.target / rel
        if member.kind == "dir":
            job.mkdir(path)
        elif member.kind in ("file", "hardlink"):
            job.write(member, path)
            written += 1
        else:
            job.symlink(member, path)
            job.check_links(member)
    return written
