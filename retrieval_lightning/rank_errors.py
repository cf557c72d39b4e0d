"""One ``error:`` report per failure under DDP, not one per rank.

A user error met after the ranks started (a checkpoint that does not fit, a missing file every rank reads) is raised
by every rank, and each printed the same lines into the one terminal. Rank 0 now leaves what it printed in a file
of the run (named by ``MASTER_ADDR`` / ``MASTER_PORT``, which no other live run on the machine shares) before
printing; another rank that fails with the same lines prints nothing, and one that fails otherwise (an image only
its shard holds) prints its own lines tagged with its rank. The ranks of one run are recognised by their process
tree as it was at start-up (Lightning's launcher starts the other ranks from rank 0, torchrun starts them all
from one agent) and by torchrun's restart count. The file is on the machine's temp dir: on several machines, the
ranks of the others print the error too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

#: how long a rank other than 0 waits for rank 0's report of the same error (rank 0 may fail a moment later)
WAIT_FOR_RANK_ZERO_S = 3.0
#: reports older than this are removed by the next rank 0 that writes one
STALE_AFTER_S = 3600.0
#: this process's parent when it started: a rank Lightning launched is rank 0's child, and is re-parented when rank 0
#: exits first (its own error printed), which must not make its report unrecognisable
_PARENT_AT_START = os.getppid()


def _attempt() -> str:
    """torchrun's restart of a failed run (same agent, same port) as part of a report's name: a rank of the new
    attempt must not read the old attempt's rank 0."""
    return f"a{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _run_folder() -> Path | None:
    port = os.environ.get("MASTER_PORT")
    if not port:
        return None
    address = os.environ.get("MASTER_ADDR", "localhost").replace(os.sep, "_")
    return Path(tempfile.gettempdir()) / "retrieval-lightning-errors" / f"{address}-{port}"


def rank() -> int:
    """This process's global rank as Lightning set it (0 outside DDP)."""
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def report_once(text: str) -> str | None:
    """What this rank should print for the error ``text`` (lines without the rank): ``text`` on rank 0, which
    records it; on another rank nothing when rank 0 reported the same, else ``text`` tagged with the rank."""
    folder = _run_folder()
    if rank() == 0:
        if folder is not None:
            _record(folder, text)
        return text
    if folder is not None and _rank_zero_reported(folder, text):
        return None
    return text.replace("error: ", f"error (rank {rank()}): ", 1)


def _encoded(text: str) -> bytes:
    """``text`` as stored and compared: a path decoded from a non-UTF-8 file name holds surrogates."""
    return text.encode("utf-8", "backslashreplace")


def _record(folder: Path, text: str) -> None:
    _remove_stale(folder.parent)
    tmp = folder / f".{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(_encoded(text))
        os.replace(tmp, folder / f"{os.getpid()}-{_PARENT_AT_START}-{_attempt()}.txt")
    except OSError:  # a report is a courtesy: the error itself must still be printed
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _remove_stale(root: Path) -> None:
    """Reports (and the run folders they leave empty) older than :data:`STALE_AFTER_S`."""
    now = time.time()
    for folder in root.glob("*") if root.is_dir() else ():
        try:
            for old in folder.iterdir():
                if now - old.stat().st_mtime > STALE_AFTER_S:
                    old.unlink()
            if now - folder.stat().st_mtime > STALE_AFTER_S and not any(folder.iterdir()):
                folder.rmdir()
        except OSError:  # another rank 0 removing it too, or not ours to remove
            pass


def _rank_zero_reported(folder: Path, text: str) -> bool:
    """Whether rank 0 of this process's run (its parent, or a process with the same parent) reported ``text``
    within :data:`WAIT_FOR_RANK_ZERO_S`."""
    parent, attempt = str(_PARENT_AT_START), _attempt()
    deadline = time.monotonic() + WAIT_FOR_RANK_ZERO_S
    while True:
        reports = [report for report in folder.glob("*.txt")
                   if report.stem.split("-")[2:] == [attempt] and parent in report.stem.split("-")[:2]]
        if reports:
            try:
                return any(report.read_bytes() == _encoded(text) for report in reports)
            except OSError:
                return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
