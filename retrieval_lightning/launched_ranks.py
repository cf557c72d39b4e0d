"""When the process that launched the other DDP ranks fails, those ranks stop too.

Lightning's launcher starts ranks 1 .. N-1 from rank 0 and kills them itself only on Ctrl-C. When rank 0 failed
alone during ``test``, ``validate`` or ``extract`` (no collective in every batch), the others went on embedding
their whole shard, holding their GPUs, long after the command had returned. Rank 0's error path now gives them a
moment to stop by themselves (a rank meeting the same error prints nothing and exits), then kills them.
"""

from __future__ import annotations

import subprocess
import time
import weakref
from typing import Any

#: how long the launched ranks get to stop by themselves: more than a rank waits for rank 0's report of the same
#: error (:data:`retrieval_lightning.rank_errors.WAIT_FOR_RANK_ZERO_S`)
GRACE_S = 10.0

_LAUNCHERS: "weakref.WeakSet[Any]" = weakref.WeakSet()


def remember_launcher(trainer: Any) -> None:
    """Note the trainer's launcher, whose ``procs`` are the ranks this process starts (none on other ranks)."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    if launcher is not None and hasattr(launcher, "procs"):
        _LAUNCHERS.add(launcher)


def stop_launched_ranks(grace_s: float = GRACE_S) -> int:
    """Wait up to ``grace_s`` for the ranks this process launched, then kill those still running; returns how
    many were killed."""
    procs = []
    for launcher in list(_LAUNCHERS):
        mine = getattr(launcher, "procs", None)
        if isinstance(mine, list):
            procs += mine
            # Lightning's watcher reads this very list and, seeing a child end with an error, SIGKILLs every
            # process, this one too (exit 137, its W&B run unfinished): it watches nothing once emptied
            mine.clear()
    live = [proc for proc in procs if isinstance(proc, subprocess.Popen) and proc.poll() is None]
    deadline = time.monotonic() + grace_s
    killed = 0
    for proc in live:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed += 1
    return killed
