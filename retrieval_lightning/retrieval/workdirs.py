"""Hidden sibling folders a store is built in, and the clean-up of those a crashed process left.

A merge into ROxford+1M or the GLDv2 index writes GBs into ``.<name>.building-<pid space>-<pid>``
before renaming it into place; a crash must not leave that behind for ever, and a live
concurrent builder's folder must not be touched.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Iterable


def atomic_write(path: Path, chunks: Iterable[str], fsync: bool = True) -> None:
    """Write ``chunks`` so that readers see the old content or the new, never a part: through a temporary file of
    this process (two runs writing at once do not share it), removed if the write fails half-way (a full disk,
    Ctrl-C), so no part is left behind."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` of a small file."""
    atomic_write(path, [text])


ON_WINDOWS = os.name == "nt"


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs in this :func:`pid_space`."""
    if ON_WINDOWS:  # there os.kill(pid, 0) is no probe: it sends Ctrl-C (0) to the process's console group
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


#: Windows' OpenProcess right to read a process's exit code, its "still running" exit code, "access denied"
_QUERY_LIMITED_INFORMATION, _STILL_ACTIVE, _ACCESS_DENIED = 0x1000, 259, 5


def _kernel32() -> Any:
    import ctypes

    return ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]


def _windows_process_alive(pid: int) -> bool:
    """Whether ``pid`` runs, asked of Windows: a process that opens and has no exit code yet."""
    import ctypes

    kernel32 = _kernel32()
    handle = kernel32.OpenProcess(_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return ctypes.get_last_error() == _ACCESS_DENIED  # exists, another user's; otherwise no such process
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True  # unknown: a live run's folder must not be touched
        return code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def pid_space() -> str:
    """Where a pid names one process, ``<host>-<pid namespace>``: containers that share a host name (host
    networking) and a folder each have their own pids, so a pid alone could name another container's live
    process."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux
        namespace = 0
    return f"{socket.gethostname()}-{namespace}"


def work_dir(path: Path, purpose: str) -> Path:
    """Hidden sibling of ``path`` owned by this process: ``.<name>.<purpose>-<pid space>-<pid>``."""
    return path.with_name(f".{path.name}.{purpose}-{pid_space()}-{os.getpid()}")


def clean_stale_builds(path: str | os.PathLike) -> list[Path]:
    """Remove the hidden build folders of ``path`` whose process (in this :func:`pid_space`) is gone.

    A crash during a merge leaves ``.<name>.building-<pid space>-<pid>``; a crash while replacing a
    store can leave the old store at ``.<name>.replaced-<pid space>-<pid>``, which is put back when
    ``path`` is missing (the new store never made it in) and deleted otherwise. Folders of live
    processes and of other pid spaces (whose processes cannot be checked from here) are left alone.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(building|replaced)-(?:(.+)-)?(\d+)$")
    space = pid_space()
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for entry in sorted(path.parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or not entry.is_dir():
            continue
        purpose, owner, pid = match.group(1), match.group(2), int(match.group(3))
        if (owner not in (None, space)) or process_alive(pid):
            continue
        if purpose == "replaced" and not path.exists():
            os.replace(entry, path)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def replace_dir(new: Path, path: Path) -> None:
    """Move the finished folder ``new`` to ``path``; an existing ``path`` is deleted only afterwards.

    The old folder is renamed aside first, so a crash at any point leaves a complete folder at
    ``path`` or the old one aside (put back by :func:`clean_stale_builds`), never nothing.
    """
    if not path.exists():
        os.replace(new, path)
        return
    aside = work_dir(path, "replaced")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


_IN_USE = re.compile(r"^\.in-use-(.+)-(\d+)$")


def mark_in_use(folder: Path) -> Path:
    """Mark ``folder`` as read and written by this process until :func:`Path.unlink` of the returned marker (or
    the process's end): :func:`in_use_by_another_process` tells a concurrent run not to delete it."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".in-use-{pid_space()}-{os.getpid()}"
    marker.touch()
    return marker


def in_use_by_another_process(folder: Path) -> bool:
    """Whether another live process marked ``folder`` (:func:`mark_in_use`); a marker of another pid space
    (a process that cannot be checked from here) counts as live."""
    space = pid_space()
    for entry in folder.glob(".in-use-*"):
        match = _IN_USE.match(entry.name)
        if match is None:
            continue
        owner, pid = match.group(1), int(match.group(2))
        if owner != space or (pid != os.getpid() and process_alive(pid)):
            return True
    return False
