"""Gathered arrays in one memory-mapped file per machine, instead of a full copy in every rank's memory.

Under DDP, evaluation and hard-negative mining gather every rank's descriptors onto every rank, so each
rank computes the same metrics (or the same table) from the same data. ROxford5k+1M at 2048-D fp32 is
8 GiB of descriptors: 64 GiB of host memory for 8 processes on one machine. With a :class:`SpillConfig`,
an array of at least ``min_bytes`` is gathered into a file in ``dir`` instead: the machine's first rank
writes it, its other ranks map it, and the file is unlinked as soon as every rank holds its mapping, so
nothing is left behind, even by a crash later. A failure before that point unlinks it too; a run killed
there (SIGKILL) leaves it, and the next spilled gather on that machine removes it. The pages are then the
kernel's page cache: one copy per machine, shared by its ranks, written back and dropped under memory
pressure (on a disk, not on tmpfs).

Everything here is a collective: every rank calls it with the same arguments, and a rank's failure (a
full disk, a ``dir`` not visible to the machine's other ranks) raises on every rank.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from retrieval_lightning.rank_zero import raise_if_any_failed

from retrieval_lightning.distributed import torch_all_gather_object
from .workdirs import pid_space, process_alive

_FILES = itertools.count()


@dataclass
class SpillConfig:
    """When a gathered array goes to a machine-shared file (see the module docstring).

    ``min_bytes``: the smallest gathered array (all ranks' rows, de-duplicated) that is spilled; ``None``
    keeps every array in memory. ``dir``: where the files go, a local disk that every rank of a machine
    sees. The default is ``retrieval-lightning-spill`` in the system's temporary directory, which follows
    ``TMPDIR`` (node-local scratch under most cluster schedulers): a run's ``default_root_dir`` is often on
    a network file system, where 8 GB per evaluation would be written across the network."""

    min_bytes: int | None = 1 << 30
    dir: str | None = None

    def __post_init__(self) -> None:
        if self.min_bytes is not None and int(self.min_bytes) < 0:
            raise ValueError(f"SpillConfig.min_bytes must be >= 0 or None, got {self.min_bytes}")

    def spills(self, nbytes: int) -> bool:
        """Whether a gathered array of ``nbytes`` is spilled."""
        return self.min_bytes is not None and nbytes > 0 and nbytes >= int(self.min_bytes)

    @property
    def directory(self) -> Path:
        """Where the files go: ``dir``, or the default in the system's temporary directory."""
        return Path(self.dir) if self.dir is not None else Path(tempfile.gettempdir()) / "retrieval-lightning-spill"


def _gather() -> Callable[[Any], list[Any]]:
    gather = torch_all_gather_object()
    if gather is None:
        raise RuntimeError("a spilled gather runs under a process group of several ranks")
    return gather


def machine_writer() -> tuple[bool, str]:
    """Whether this rank writes its machine's file, and a tag naming that file: the ranks of one machine
    (one host name) share the file of its lowest rank; the writer's pid keeps concurrent runs apart."""
    host = socket.gethostname()
    everyone = _gather()((host, pid_space(), os.getpid()))
    first = next(rank for rank, (name, _, _) in enumerate(everyone) if name == host)
    _, space, pid = everyone[first]
    return first == dist.get_rank(), f"{space}-{pid}"


def remove_left_by_killed_runs(directory: str | Path) -> list[Path]:
    """Delete the files in ``directory`` that killed runs left behind (a SIGKILL between a file's creation
    and its unlink), and return them: every ``<array>-<space>-<pid>-<n>.bin`` of this :func:`pid_space`
    whose writer ``pid`` no longer runs. A live run's file, and another machine's, are left alone."""
    pattern = re.compile(rf"\w+-{re.escape(pid_space())}-(\d+)-\d+\.bin")  # no host is a suffix
    removed = []
    for path in sorted(Path(directory).glob("*.bin")):
        found = pattern.fullmatch(path.name)
        if found is not None and not process_alive(int(found.group(1))):
            try:
                path.unlink(missing_ok=True)
            except OSError:  # another user's file: theirs to remove, and no reason to fail this gather
                continue
            removed.append(path)
    return removed


def _allocate(path: Path, rows: int, row_bytes: int) -> np.memmap:
    """A new file of ``rows * row_bytes`` bytes, its blocks reserved now: a full disk fails here with
    ``ENOSPC`` rather than as a SIGBUS when a page of the mapping is first written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(handle.fileno(), 0, rows * row_bytes)
        else:
            handle.truncate(rows * row_bytes)
    return np.memmap(path, dtype=np.uint8, mode="r+", shape=(rows, row_bytes))


def _map(path: Path, rows: int, row_bytes: int) -> np.memmap:
    if not path.is_file() or path.stat().st_size != rows * row_bytes:
        raise FileNotFoundError(f"spilled gather: {path} is missing or has the wrong size on this rank; the "
                                "spill dir must be one directory that every rank of a machine sees (a local disk)")
    # copy-on-write: a writable tensor (torch warns on read-only arrays) whose writes never reach the file
    return np.memmap(path, dtype=np.uint8, mode="c", shape=(rows, row_bytes))


def gather_into_file(
    rows: int, row_bytes: int, directory: str | Path, name: str, fill: Callable[[Tensor | None], None]
) -> Tensor:
    """A ``(rows, row_bytes)`` uint8 tensor backed by a machine-shared file in ``directory``.

    ``fill(into)`` runs the gather on every rank: on the writer ``into`` is the file's mapping, to be
    filled; elsewhere it is ``None`` (the rows received are dropped). The other ranks map the file once
    the writer is done, and the file is unlinked when every rank has mapped it."""
    writer, tag = machine_writer()
    stem = re.sub(r"\W", "_", name)  # a word: the clean-up of killed runs parses the name
    path = Path(directory) / f"{stem}-{tag}-{next(_FILES)}.bin"
    what = f"spilled gather of {name!r} into {path}"
    mapping, failure = None, None
    try:
        if writer:
            try:
                remove_left_by_killed_runs(path.parent)  # nothing to do where the dir does not exist yet
                mapping = _allocate(path, rows, row_bytes)
            except OSError as err:
                failure = OSError(f"{what}: {err} (set spill.dir to a disk with {rows * row_bytes} bytes free, "
                                  "or spill.min_bytes to null to gather in memory)")
        raise_if_any_failed(failure, _gather(), what)
        try:
            fill(torch.from_numpy(mapping) if mapping is not None else None)
            if mapping is not None:
                mapping.flush()  # for a dir on a network file system; on a local disk the page cache is shared
            # the writer too maps it copy-on-write: an in-place change on one rank must not reach the others' rows
            mapping = _map(path, rows, row_bytes)
        except Exception as err:
            failure = err
        raise_if_any_failed(failure, _gather(), what)  # past it, every rank holds its mapping
    finally:  # after the last collective: every rank has its mapping, or none will map the file
        if writer:
            with contextlib.suppress(OSError):  # never made (a bad dir): the error raised above says why
                path.unlink(missing_ok=True)
    return torch.from_numpy(mapping)

