"""Resumable, verified, parallel downloads and safe archive extraction; knows no dataset.

Why it exists: benchmark datasets come as hundreds of large archives on plain HTTP servers. A
download must survive interruptions (``.part`` files continued with HTTP ``Range``; a server
that ignores ``Range`` is handled by starting over), must never trust a corrupt archive (md5
against a published digest; a bad file is deleted, re-fetched a bounded number of times and
never extracted), must never let an archive write outside its target directory, and a second
run must be a no-op (a marker file per completed item). HTTP goes through ``urllib`` only.

Markers live next to each downloaded file: ``.<name>.done`` once the file is complete and
verified, ``.<name>.extracted`` once it has been unpacked (the archive itself may then be
deleted).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import re
import stat
import tarfile
import threading
import urllib.error
import urllib.request
import zipfile
import zlib
from concurrent.futures import ALL_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator, Sequence

from tqdm.auto import tqdm

_CHUNK = 1 << 20
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_MD5_RE = re.compile(r"^[0-9a-f]{32}$")


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the URL and the HTTP status if any."""


class ChecksumError(DownloadError):
    """A file stayed corrupt (md5 mismatch or unreadable archive) after every allowed re-fetch."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the target directory, or is not a file."""


class _Transient(Exception):
    """A failure worth retrying (dropped connection, 5xx); the ``.part`` file is kept."""


class _CorruptArchive(Exception):
    """The archive cannot be read to its end; it must be fetched again."""


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch, how to verify it and where (if anywhere) to unpack it.

    ``md5`` is a known digest; alternatively ``md5_url`` names an md5sum-style list (saved to
    ``md5_dest``) whose entry for this file is the digest. With ``extract_to`` the file is an
    archive (tar, tar.gz, tgz or zip) unpacked there; ``flatten`` keeps only regular files,
    by base name; ``keep_archive=False`` deletes the archive once unpacked.
    """

    url: str
    dest: Path
    md5: str | None = None
    md5_url: str | None = None
    md5_dest: Path | None = None
    extract_to: Path | None = None
    flatten: bool = False
    keep_archive: bool = True

    def __post_init__(self) -> None:
        if self.md5 is not None and not _MD5_RE.match(self.md5.lower()):
            raise ValueError(f"{self.url}: md5 {self.md5!r} is not 32 hex digits")
        if self.md5 is not None and self.md5_url is not None:
            raise ValueError(f"{self.url}: give md5 or md5_url, not both")
        if (self.md5_url is None) != (self.md5_dest is None):
            raise ValueError(f"{self.url}: md5_url and md5_dest go together")


@dataclass
class DownloadSummary:
    """What a run did, as lists of destination paths (``str``)."""

    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refetched: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    extracted: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{len(self.fetched)} fetched, {len(self.skipped)} skipped, "
                f"{len(self.refetched)} re-fetched after a failed check, {len(self.resumed)} resumed, "
                f"{len(self.extracted)} extracted")


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in chunks so multi-gigabyte archives fit in memory."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_md5_list(path: Path, name: str | None = None) -> str:
    """The digest for ``name`` in an md5sum-style list (``<hex>  <file>`` lines, or a bare hex)."""
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        listed = fields[1].lstrip("*") if len(fields) > 1 else None
        if name is not None and listed is not None and PurePosixPath(listed).name != name:
            continue
        digest = fields[0].lower()
        if not _MD5_RE.match(digest):
            raise ValueError(f"{path}:{lineno}: {fields[0]!r} is not an md5 digest")
        return digest
    raise ValueError(f"{path}: no md5 digest" + (f" for {name}" if name else ""))


# --------------------------------------------------------------------------- extraction


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
            raise _CorruptArchive(f"member {info.name!r} is cut short")
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
    :class:`UnsafeArchiveError` naming the archive and the member. ``flatten`` keeps regular
    files only, under their base names (links and directories are skipped).
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
        raise _CorruptArchive(f"{archive}: cannot open archive: {exc}") from exc
    with handle:
        try:
            if isinstance(handle, zipfile.ZipFile):
                if (bad := handle.testzip()) is not None:
                    raise _CorruptArchive(f"{archive}: member {bad!r} fails its CRC")
                members = list(_zip_members(handle))
            else:
                size = archive.stat().st_size if _is_plain_tar(archive) else None
                members = list(_tar_members(handle, size))
            checked = [(member, _check(archive, member)) for member in members]
            return _unpack(archive, checked, target, root, flatten)
        except (tarfile.ReadError, EOFError, zlib.error, zipfile.BadZipFile, gzip.BadGzipFile) as exc:
            raise _CorruptArchive(f"{archive}: cannot be read to its end: {exc}") from exc


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


# --------------------------------------------------------------------------- HTTP


class _Progress:
    """One byte bar for all parallel transfers; thread-safe, and exact across resumes and restarts."""

    def __init__(self, enabled: bool, desc: str):
        self._bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled)
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}

    def size(self, key: str, size: int) -> None:
        with self._lock:
            self._sizes[key] = size
            self._bar.total = sum(self._sizes.values())
            self._bar.refresh()

    def update(self, count: int) -> None:
        with self._lock:
            self._bar.update(count)

    def close(self) -> None:
        self._bar.close()


def _range_start(header: str | None) -> int | None:
    match = re.match(r"bytes\s+(\d+)-", header or "")
    return int(match.group(1)) if match else None


class _Fetcher:
    """Fetches one URL into ``<dest>.part`` with Range resumes and bounded retries."""

    def __init__(self, progress: _Progress, stop: threading.Event, retries: int, retry_wait: float, timeout: float):
        self.progress, self.stop = progress, stop
        self.retries, self.retry_wait, self.timeout = retries, retry_wait, timeout

    def fetch(self, url: str, part: Path) -> bool:
        """Complete ``part`` from ``url``; True when an earlier partial transfer was continued."""
        part.parent.mkdir(parents=True, exist_ok=True)
        credited = [0]
        for attempt in range(self.retries + 1):
            try:
                return self._attempt(url, part, credited)
            except _Transient as exc:
                if attempt == self.retries:
                    raise DownloadError(f"{url}: failed after {attempt + 1} attempts: {exc}") from None
                if self.stop.wait(self.retry_wait * (attempt + 1)):
                    raise DownloadError(f"{url}: interrupted") from None
        raise AssertionError("unreachable")

    def _attempt(self, url: str, part: Path, credited: list[int]) -> bool:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "retrieval-lightning"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:
                whole = re.fullmatch(r"bytes \*/(\d+)", exc.headers.get("Content-Range", ""))
                if whole and int(whole.group(1)) == offset:
                    return True  # the part file was already complete
                part.unlink()
                raise _Transient(f"HTTP 416 for bytes {offset}-; starting over") from None
            if exc.code in _RETRY_STATUSES:
                raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        with response:
            start = 0
            if offset and response.status == 206:
                start = _range_start(response.headers.get("Content-Range")) or 0
                if start != offset:
                    part.unlink()
                    raise _Transient(f"server answered bytes {start}- to a request for {offset}-; starting over")
            elif response.status != 200:
                raise DownloadError(f"{url}: unexpected HTTP {response.status} {response.reason}")
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None else None
            if expected is not None:
                self.progress.size(url, start + expected)
            self.progress.update(start - credited[0])
            credited[0] = start
            received = 0
            with open(part, "ab" if start else "wb") as out:
                try:
                    while chunk := response.read(_CHUNK):
                        if self.stop.is_set():
                            raise DownloadError(f"{url}: interrupted; {part} kept for resuming")
                        out.write(chunk)
                        received += len(chunk)
                        credited[0] += len(chunk)
                        self.progress.update(len(chunk))
                except (OSError, http.client.HTTPException) as exc:
                    raise _Transient(f"connection lost after {start + received} bytes: {exc}") from None
            if expected is not None and received < expected:
                raise _Transient(f"connection closed after {start + received} of {start + expected} bytes")
            return start > 0


# --------------------------------------------------------------------------- one item


def _marker(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}")


def _write_marker(path: Path, content: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class _Outcome:
    status: str  # "fetched", "skipped" or "refetched"
    resumed: bool = False
    extracted: bool = False


def _expected_md5(item: RemoteFile, fetcher: _Fetcher) -> str | None:
    if item.md5 is not None:
        return item.md5.lower()
    if item.md5_url is None or item.md5_dest is None:
        return None
    if not item.md5_dest.exists():
        part = item.md5_dest.with_name(item.md5_dest.name + ".part")
        fetcher.fetch(item.md5_url, part)
        os.replace(part, item.md5_dest)
    return read_md5_list(item.md5_dest, item.dest.name)


def _complete(item: RemoteFile, fetcher: _Fetcher, checksum_retries: int) -> _Outcome:
    """Bring one item to its finished state: fetched, verified and, if asked, extracted."""
    done, extracted = _marker(item.dest, "done"), _marker(item.dest, "extracted")
    if item.extract_to is not None and extracted.exists():
        return _Outcome("skipped")
    if item.extract_to is None and done.exists() and item.dest.exists():
        return _Outcome("skipped")
    expected = _expected_md5(item, fetcher)
    outcome = _Outcome("skipped" if item.dest.exists() else "fetched")
    verified = done.exists() and item.dest.exists()
    part = item.dest.with_name(item.dest.name + ".part")
    problem = ""
    for _ in range(checksum_retries + 1):
        if item.dest.exists() and not verified and expected and (got := file_md5(item.dest)) != expected:
            item.dest.unlink()
            problem = f"md5 {got} differs from the published {expected}"
            outcome.status = "refetched"
        if not item.dest.exists():
            outcome.resumed |= fetcher.fetch(item.url, part)
            if expected and (got := file_md5(part)) != expected:
                part.unlink()
                problem = f"md5 {got} differs from the published {expected}"
                outcome.status = "refetched"
                continue
            os.replace(part, item.dest)
        _write_marker(done, {"url": item.url, "md5": expected, "bytes": item.dest.stat().st_size})
        verified = True
        if item.extract_to is None:
            return outcome
        try:
            count = extract_archive(item.dest, item.extract_to, item.flatten)
        except _CorruptArchive as exc:
            item.dest.unlink()
            done.unlink()
            verified = False
            problem = str(exc)
            outcome.status = "refetched"
            continue
        _write_marker(extracted, {"url": item.url, "md5": expected, "files": count, "into": str(item.extract_to)})
        outcome.extracted = True
        if not item.keep_archive:
            item.dest.unlink()
            done.unlink()
        return outcome
    raise ChecksumError(f"{item.url}: still bad after {checksum_retries + 1} downloads ({problem}); "
                        f"nothing was extracted")


# --------------------------------------------------------------------------- many items


def download_files(items: Sequence[RemoteFile], workers: int = 4, progress: bool = True, retries: int = 3,
                   retry_wait: float = 1.0, checksum_retries: int = 2, timeout: float = 60.0,
                   desc: str = "download") -> DownloadSummary:
    """Fetch, verify and extract ``items`` on a thread pool; returns what was done.

    Every item is attempted even when another fails; afterwards the first failure (in item
    order) is raised, with the others attached as notes. Interrupting (Ctrl-C) keeps the
    ``.part`` files, so the next run resumes them.
    """
    dests = [item.dest for item in items]
    if len(set(dests)) != len(dests):
        twice = sorted({str(d) for d in dests if dests.count(d) > 1})
        raise ValueError(f"several items share a destination: {twice}")
    bar = _Progress(progress, desc)
    stop = threading.Event()
    fetcher = _Fetcher(bar, stop, retries, retry_wait, timeout)
    executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="download")
    futures = [executor.submit(_complete, item, fetcher, checksum_retries) for item in items]
    try:
        wait(futures, return_when=ALL_COMPLETED)
    except BaseException:
        stop.set()
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
        raise
    executor.shutdown(wait=True)
    bar.close()
    summary = DownloadSummary()
    errors: list[BaseException] = []
    for item, future in zip(items, futures):
        if (error := future.exception()) is not None:
            errors.append(error)
            continue
        outcome = future.result()
        getattr(summary, outcome.status).append(str(item.dest))
        if outcome.resumed:
            summary.resumed.append(str(item.dest))
        if outcome.extracted:
            summary.extracted.append(str(item.dest))
    if errors:
        for other in errors[1:]:
            errors[0].add_note(f"also failed: {other}")
        raise errors[0]
    return summary
