"""Safe extraction of tar, tar.gz, tgz and zip archives; knows no dataset and no HTTP.

Why it exists: downloaded archives are untrusted. Every member is checked before anything is
written: nothing may land outside the target directory (absolute paths, ``..``, links pointing
out, directories reached through links), devices and fifos are refused, and an archive that
cannot be read to its end is reported as corrupt so the caller can fetch it again.
"""

from __future__ import annotations

import gzip
import os
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator, Sequence

_CHUNK = 1 << 20


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the target directory, or is not a file."""


class CorruptArchiveError(Exception):
    """The archive cannot be read to its end (truncated, bad CRC, not an archive); fetch it again."""


@dataclass(frozen=True)
class _Member:
    name: str
    kind: str  # "file", "dir", "symlink", "hardlink" or "other"
    link: str
    open: Callable[[], IO[bytes]]


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


def _tar_members(tar: tarfile.TarFile, size: int | None) -> Iterator[_Member]:
    for info in tar:
        if size is not None and info.isreg() and info.offset_data + info.size > size:
            raise CorruptArchiveError(f"member {info.name!r} is cut short")
        kind = ("file" if info.isreg() else "dir" if info.isdir() else "symlink" if info.issym()
                else "hardlink" if info.islnk() else "other")
        yield _Member(info.name, kind, info.linkname, lambda info=info: tar.extractfile(info))


def _zip_members(archive: zipfile.ZipFile) -> Iterator[_Member]:
    for info in archive.infolist():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            yield _Member(info.filename, "symlink", archive.read(info).decode(), lambda info=info: archive.open(info))
        else:
            kind = "dir" if info.is_dir() else "file"
            yield _Member(info.filename, kind, "", lambda info=info: archive.open(info))


def _check(archive: Path, member: _Member) -> PurePosixPath:
    """The member's safe relative path; raises if it or its link target leaves the root."""
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


def _guard(archive: Path, member: str, root: str, directory: Path) -> Path:
    """Refuse a directory that resolves outside ``root`` through a link; checked before creating it."""
    if not _inside(root, os.path.realpath(directory)):
        raise UnsafeArchiveError(f"{archive}: member {member!r} would be written outside {root} through a link")
    return directory


def _write(source: IO[bytes], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.extracting")
    with source, open(tmp, "wb") as out:
        while chunk := source.read(_CHUNK):
            out.write(chunk)
    os.replace(tmp, path)


def extract_archive(archive: Path, target: Path, flatten: bool = False) -> int:
    """Unpack ``archive`` into ``target`` after checking every member; returns files written.

    The whole member list is checked before anything is written: an absolute path, a ``..``
    climbing out, a link pointing outside or a device member raises
    :class:`UnsafeArchiveError` naming the archive and the member; an archive that cannot be read
    to its end raises :class:`CorruptArchiveError`. ``flatten`` keeps regular files only, under
    their base names (links and directories are skipped).
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(target)
    try:
        if zipfile.is_zipfile(archive):
            handle: tarfile.TarFile | zipfile.ZipFile = zipfile.ZipFile(archive)
        else:
            handle = tarfile.open(archive, "r:*")
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise CorruptArchiveError(f"{archive}: cannot open archive: {exc}") from exc
    with handle:
        try:
            if isinstance(handle, zipfile.ZipFile):
                if (bad := handle.testzip()) is not None:
                    raise CorruptArchiveError(f"{archive}: member {bad!r} fails its CRC")
                members = list(_zip_members(handle))
            else:
                size = archive.stat().st_size if _is_plain_tar(archive) else None
                members = list(_tar_members(handle, size))
            checked = [(member, _check(archive, member)) for member in members]
            return _unpack(archive, checked, target, root, flatten)
        except (tarfile.ReadError, EOFError, zlib.error, zipfile.BadZipFile, gzip.BadGzipFile) as exc:
            raise CorruptArchiveError(f"{archive}: cannot be read to its end: {exc}") from exc


def _is_plain_tar(archive: Path) -> bool:
    with open(archive, "rb") as handle:
        head = handle.read(4)
    return not head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zX"))


def _unpack(archive: Path, checked: Sequence[tuple[_Member, PurePosixPath]], target: Path,
            root: str, flatten: bool) -> int:
    written = 0
    for member, rel in checked:
        if flatten:
            if member.kind in ("file", "hardlink") and rel.name:
                _guard(archive, member.name, root, target)
                _write(member.open(), target / rel.name)
                written += 1
            continue
        path = target / rel
        if member.kind == "dir":
            _guard(archive, member.name, root, path).mkdir(parents=True, exist_ok=True)
        elif member.kind in ("file", "hardlink"):
            _guard(archive, member.name, root, path.parent)
            _write(member.open(), path)
            written += 1
        else:
            _guard(archive, member.name, root, path.parent)
            if not _inside(root, os.path.realpath(path.parent / member.link)):
                raise UnsafeArchiveError(f"{archive}: member {member.name!r} links outside to {member.link!r}")
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink() or path.exists():
                path.unlink()
            os.symlink(member.link, path)
    return written
