"""Work that only rank 0 does (merging shards into a store), without leaving the other ranks waiting.

Under DDP the other ranks wait at a barrier while rank 0 merges. If the merge raised on rank 0 alone,
they would wait for it until the process group's timeout (30 minutes under NCCL). :func:`on_rank_zero`
broadcasts whether rank 0 failed, so every rank stops with an error at once. Work split over the
ranks, where any one may fail alone (re-ranking its share of the queries), ends with
:func:`raise_if_any_failed` for the same reason.
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


class OtherRankFailed(RuntimeError):
    """Raised on the ranks whose share succeeded when another rank's failed (its error is in its output)."""


def raise_if_any_failed(error: Exception | None, all_gather_object: Callable[[Any], list[Any]] | None,
                        what: str) -> None:
    """After work split over ranks, where any rank may fail alone: every rank calls it (a collective),
    and if any failed every rank raises, its own error or :class:`OtherRankFailed`, instead of the
    others waiting in their next collective until the process group's timeout.
    ``all_gather_object`` is ``None`` without a process group."""
    failed = [error is not None] if all_gather_object is None else all_gather_object(error is not None)
    if error is not None:
        raise error
    if any(failed):
        ranks = [rank for rank, bad in enumerate(failed) if bad]
        raise OtherRankFailed(f"{what}: rank(s) {ranks} failed (their error is in their output)")
