"""Work that only rank 0 does (merging shards into a store), without leaving the other ranks waiting.

Under DDP the other ranks wait at a barrier while rank 0 merges. If the merge raised on rank 0 alone,
they would wait for it until the process group's timeout (30 minutes under NCCL). :func:`on_rank_zero`
broadcasts whether rank 0 failed, so every rank stops with an error at once.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when rank 0 failed (its own error is in rank 0's output)."""


def on_rank_zero(run: Callable[[], T], is_zero: bool, broadcast: Callable[[Any], Any], what: str) -> T | None:
    """``run()`` on rank 0 only (``None`` elsewhere); if it raised, every rank raises.

    ``broadcast(value)`` must return rank 0's ``value`` on every rank (a synchronisation point, as
    Lightning's ``strategy.broadcast`` is); without a process group, ``lambda value: value``.
    """
    result, error = None, None
    if is_zero:
        try:
            result = run()
        except Exception as err:  # re-raised below, once the other ranks know
            error = err
    if broadcast(error is not None):
        if error is not None:
            raise error
        raise RankZeroFailed(f"{what}: rank 0 failed (its error is in its output)")
    return result
