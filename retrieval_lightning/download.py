"""Resumable, verified, parallel downloads; knows no dataset.

Why it exists: benchmark datasets come as hundreds of large archives on plain HTTP servers. A
download must survive interruptions (``.part`` files continued with HTTP ``Range``; a server
that ignores ``Range`` is handled by starting over), must never trust a corrupt archive (md5
against a published digest; a bad file is deleted, re-fetched a bounded number of times and
never extracted), must never let an archive write outside its target directory (extraction is
:mod:`retrieval_lightning.archives`, re-exported here), and a second run must be a no-op (a
marker file per completed item). HTTP goes through ``urllib`` only.

Markers live next to each downloaded file: ``.<name>.done`` once the file is complete and
verified, ``.<name>.extracted`` once it has been unpacked (the archive itself may then be
deleted).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ALL_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

from tqdm.auto import tqdm

from retrieval_lightning.archives import CorruptArchiveError, UnsafeArchiveError, extract_archive
from retrieval_lightning.outputs import check_folder_can_be_made

__all__ = [
    "ChecksumError",
    "CorruptArchiveError",
    "DownloadError",
    "DownloadSummary",
    "RemoteFile",
    "UnsafeArchiveError",
    "download_files",
    "extract_archive",
    "file_md5",
    "read_md5_list",
]

_CHUNK = 1 << 20
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_MD5_RE = re.compile(r"^[0-9a-f]{32}$")


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the URL and the HTTP status if any."""


class ChecksumError(DownloadError):
    """A file stayed corrupt (md5 mismatch or unreadable archive) after every allowed re-fetch."""


class _Transient(Exception):
    """A failure worth retrying (dropped connection, 5xx); the ``.part`` file is kept."""


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


def with_others(first: BaseException, others: Sequence[BaseException]) -> BaseException:
    """``first``, noting the other failures (``add_note`` on Python 3.11+, in its message on 3.10)."""
    for other in others:
        if hasattr(first, "add_note"):
            first.add_note(f"also failed: {other}")
        else:
            first.args = (f"{first.args[0] if first.args else first}; also failed: {other}", *first.args[1:])
    return first


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


# --------------------------------------------------------------------------- HTTP


class _Progress:
    """One byte bar for all parallel transfers; thread-safe, and exact across resumes and restarts.

    Its byte total only grows as transfers start (a server tells a file's size when asked for it), so
    the bar also counts finished files out of all of them: that is the progress over a 620-file run."""

    def __init__(self, enabled: bool, desc: str, files: int = 0):
        self._bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled)
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}
        self._files, self._done = files, 0
        if files:
            self._bar.set_postfix_str(f"0/{files} files", refresh=False)

    def file_done(self) -> None:
        with self._lock:
            self._done += 1
            self._bar.set_postfix_str(f"{self._done}/{self._files} files")

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
        self._answered: set[str] = set()  # hosts that sent an HTTP response (any status) in this run
        self._silent: dict[str, str] = {}  # hosts that never answered an item's every attempt: why
        self._lock = threading.Lock()

    def fetch(self, url: str, part: Path) -> bool:
        """Complete ``part`` from ``url``; True when an earlier partial transfer was continued.

        A host that has not answered any attempt of a whole item (refused, unresolvable, timing out) is not
        asked again in this run: GLDv2's 629 items each retried a host that was down, about 16 minutes before
        the error. A host that answered once keeps its per-item retries (a dropped connection is transient)."""
        host = urllib.parse.urlsplit(url).netloc
        with self._lock:
            silent = self._silent.get(host)
        if silent is not None:
            raise DownloadError(f"{url}: not tried, {host} did not answer an earlier file's {self.retries + 1} "
                                f"attempts ({silent}); a re-run resumes every file")
        part.parent.mkdir(parents=True, exist_ok=True)
        credited = [0]
        for attempt in range(self.retries + 1):
            try:
                return self._attempt(url, part, credited)
            except _Transient as exc:
                if attempt == self.retries:
                    with self._lock:
                        if host not in self._answered:
                            self._silent.setdefault(host, str(exc))
                    raise DownloadError(f"{url}: failed after {attempt + 1} attempts: {exc}") from None
                if self.stop.wait(self.retry_wait * (attempt + 1)):
                    raise DownloadError(f"{url}: interrupted") from None
        raise AssertionError("unreachable")

    def _heard_from(self, url: str) -> None:
        with self._lock:
            self._answered.add(urllib.parse.urlsplit(url).netloc)

    def _attempt(self, url: str, part: Path, credited: list[int]) -> bool:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "retrieval-lightning"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            self._heard_from(url)
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
        self._heard_from(url)
        with response:
            start = 0
            if offset and response.status == 206:
                start = _range_start(response.headers.get("Content-Range")) or 0
                if start != offset:
                    part.unlink()
                    raise _Transient(f"server answered bytes {start}- to a request for {offset}-; starting over")
            elif response.status != 200:
                raise DownloadError(f"{url}: unexpected HTTP {response.status} {response.reason}")
            kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind == "text/html" and part.name.removesuffix(".part").rsplit(".", 1)[-1] not in ("html", "htm"):
                # a maintenance or login page with status 200: without a digest it would be kept as the file
                raise DownloadError(f"{url}: the server sent an HTML page (Content-Type: text/html), not the file")
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None else None
            if expected is not None:
                self.progress.size(url, start + expected)
            self.progress.update(start - credited[0])
            credited[0] = start
            received = 0
            unwritable: OSError | None = None
            with open(part, "ab" if start else "wb") as out:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise _Transient(f"connection lost after {start + received} bytes: {exc}") from None
                    if not chunk:
                        break
                    if self.stop.is_set():
                        raise DownloadError(f"{url}: interrupted; {part} kept for resuming")
                    try:
                        out.write(chunk)
                    except OSError as exc:  # a full disk or quota is not the connection: retrying cannot help
                        unwritable = exc
                        break
                    received += len(chunk)
                    credited[0] += len(chunk)
                    self.progress.update(len(chunk))
            if unwritable is not None:  # the bytes on disk, part of the last chunk too: where a re-run resumes
                written = part.stat().st_size if part.exists() else start + received
                reason = unwritable.strerror or unwritable
                raise DownloadError(f"{part}: cannot write after {written} bytes ({reason}); it is kept, and a re-run "
                                    "resumes it once there is room")
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
    """The published digest; a cached md5 list that cannot be read is fetched again once."""
    if item.md5 is not None:
        return item.md5.lower()
    if item.md5_url is None or item.md5_dest is None:
        return None
    for attempt in range(2):
        if not item.md5_dest.exists():
            part = item.md5_dest.with_name(item.md5_dest.name + ".part")
            fetcher.fetch(item.md5_url, part)
            os.replace(part, item.md5_dest)
        try:
            return read_md5_list(item.md5_dest, item.dest.name)
        except (ValueError, UnicodeDecodeError) as exc:
            item.md5_dest.unlink()
            if attempt:
                raise DownloadError(f"{item.md5_url}: the md5 list saved as {item.md5_dest} is malformed "
                                    f"after a fresh download ({exc})") from None
    raise AssertionError("unreachable")


def _complete(item: RemoteFile, fetcher: _Fetcher, checksum_retries: int, list_refreshed: bool = False) -> _Outcome:
    """Bring one item to its finished state: fetched, verified and, if asked, extracted."""
    done, extracted = _marker(item.dest, "done"), _marker(item.dest, "extracted")
    if item.extract_to is not None and extracted.exists():
        if not item.keep_archive and item.dest.exists():  # kept by an earlier --keep_archives run
            item.dest.unlink()
            done.unlink(missing_ok=True)
        return _Outcome("skipped")
    if item.extract_to is None and done.exists() and item.dest.exists():
        return _Outcome("skipped")
    expected = _expected_md5(item, fetcher)
    outcome = _Outcome("skipped" if item.dest.exists() else "fetched")
    verified = done.exists() and item.dest.exists()
    # a file found in place without our marker, no digest published and no archive check to catch a truncation
    # (revisitop1m.txt, a gnd pickle; the official download.py writes them in place): fetched again, replacing it
    unverifiable = item.dest.exists() and not verified and expected is None and item.extract_to is None
    if unverifiable:
        outcome.status = "refetched"
    part = item.dest.with_name(item.dest.name + ".part")
    problem = ""
    for _ in range(checksum_retries + 1):
        if item.dest.exists() and not verified and expected and (got := file_md5(item.dest)) != expected:
            item.dest.unlink()
            problem = f"md5 {got} differs from the published {expected}"
            outcome.status = "refetched"
        if not item.dest.exists() or unverifiable:
            unverifiable = False
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
        except CorruptArchiveError as exc:
            item.dest.unlink()
            done.unlink()
            verified = False
            problem = str(exc)
            outcome.status = "refetched"
            continue
        except OSError as exc:  # a full disk while extracting: the archive is sound, so it stays
            raise DownloadError(f"{item.dest}: extracting into {item.extract_to} failed ({exc.strerror or exc}); "
                                "the archive is kept and a re-run extracts it again") from None
        _write_marker(extracted, {"url": item.url, "md5": expected, "files": count, "into": str(item.extract_to)})
        outcome.extracted = True
        if not item.keep_archive:
            item.dest.unlink()
            done.unlink()
        return outcome
    if item.md5 is None and item.md5_dest is not None and not list_refreshed:
        # the digest came from a saved md5 list, which may be stale (an archive republished with its list):
        # fetch the list again once, and the archive again only if the published digest changed
        item.md5_dest.unlink(missing_ok=True)
        if _expected_md5(item, fetcher) != expected:
            return _complete(item, fetcher, checksum_retries, list_refreshed=True)
    source = f", digest from {item.md5_dest}" if item.md5 is None and item.md5_dest is not None else ""
    raise ChecksumError(f"{item.url}: still bad after {checksum_retries + 1} downloads ({problem}{source}); "
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
    for folder in sorted({item.dest.parent for item in items} | {item.extract_to for item in items
                                                                  if item.extract_to is not None}):
        check_folder_can_be_made(folder, "download folder")  # once, not once per file from every worker
    bar = _Progress(progress, desc, files=len(items))
    stop = threading.Event()
    fetcher = _Fetcher(bar, stop, retries, retry_wait, timeout)
    executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="download")
    futures = [executor.submit(_complete, item, fetcher, checksum_retries) for item in items]
    for future in futures:
        future.add_done_callback(lambda _: bar.file_done())
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
        raise with_others(errors[0], errors[1:])
    return summary
